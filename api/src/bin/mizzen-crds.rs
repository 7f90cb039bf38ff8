//! Prints Mizzen's CRDs as YAML: `cargo run -p mizzen-api --bin mizzen-crds > manifests/crds.yaml`.

fn main() -> std::process::ExitCode {
    match mizzen_api::policy::crds_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mizzen-crds: cannot render CRDs: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
