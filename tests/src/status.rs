//! The status conditions Mizzen writes, as kubectl reads them.

use std::time::Duration;

use serde_json::Value;

use crate::{Cluster, eventually_some};

/// How long the CA may take to write a condition.
const WRITTEN: Duration = Duration::from_secs(30);

/// The `Accepted` condition Mizzen wrote for `kind` (as kubectl names it)
/// `name` in `ns`, once `ok` holds of it: for a Gateway API route
/// (`httproute`, `grpcroute`) the one in the mesh's `status.parents`
/// entry, else the one in `status.conditions`.
pub async fn accepted(kind: &str, ns: &str, name: &str, ok: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let path = match kind {
        "httproute" | "grpcroute" => {
            "{.status.parents[?(@.controllerName==\"mizzen.dev/mesh\")].conditions[?(@.type==\"Accepted\")]}"
        }
        _ => "{.status.conditions[?(@.type==\"Accepted\")]}",
    };
    let what = format!("the Accepted condition of {kind} {ns}/{name}");
    eventually_some(WRITTEN, &what, || async {
        let out = Cluster::get()
            .kubectl(["get", kind, "-n", ns, name, "-o", &format!("jsonpath={path}")])
            .run()
            .await?;
        let condition: Option<Value> = serde_json::from_str(out.trim()).ok();
        Ok(condition.filter(|c| ok(c)))
    })
    .await
}
