//! `manifests/crds.yaml` must be exactly what the types generate.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds.yaml");
    let generated = mizzen_api::policy::crds_yaml().expect("render CRDs");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        checked_in == generated,
        "{} is out of date with mizzen-api's types; regenerate it with\n  \
         cargo run -p mizzen-api --bin mizzen-crds > manifests/crds.yaml",
        path.display()
    );
}
