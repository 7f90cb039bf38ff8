//! Manual injection: `mizzen-injector inject -f FILE|-` for
//! `kubectl apply -f -` pipelines. Reads multi-document YAML, injects the
//! pod (template) of Pods, Deployments, StatefulSets, DaemonSets,
//! ReplicaSets, Jobs and CronJobs, and passes every other document through.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

use crate::config::InjectConfig;
use crate::inject::{self, INJECT_LABEL, InjectError};

/// Why a document could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("document {index}: not YAML: {reason}")]
    Yaml { index: usize, reason: String },
    #[error("document {index} ({kind} {name}): {source}")]
    Inject {
        index: usize,
        kind: String,
        name: String,
        source: InjectError,
    },
    #[error("document {index} ({kind} {name}): the pod template does not parse: {reason}")]
    Template {
        index: usize,
        kind: String,
        name: String,
        reason: String,
    },
}

/// Where the pod template of a kind lives.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            Some(&["spec", "template"])
        }
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn at<'a>(v: &'a mut serde_json::Value, path: &[&str]) -> Option<&'a mut serde_json::Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

/// Injects every document of `input`; returns YAML and what happened to each.
pub fn inject_documents(input: &str, cfg: &InjectConfig, native: bool) -> Result<(String, Vec<String>), ManualError> {
    let mut out = String::new();
    let mut report = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let mut value = serde_json::Value::deserialize(doc).map_err(|e| ManualError::Yaml {
            index,
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or("").to_owned();
        let name = value["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let namespace = value["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
        match template_path(&kind).and_then(|p| at(&mut value, p)) {
            None => report.push(format!("{kind} {name}: passed through")),
            Some(template) => {
                let template_err = |reason: String| ManualError::Template {
                    index,
                    kind: kind.clone(),
                    name: name.clone(),
                    reason,
                };
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": template.get("metadata").cloned().unwrap_or(serde_json::json!({})),
                    "spec": template.get("spec").cloned().unwrap_or(serde_json::Value::Null),
                }))
                .map_err(|e| template_err(e.to_string()))?;
                // Asking for manual injection is asking for injection.
                let labels = BTreeMap::from([(INJECT_LABEL.to_string(), "enabled".to_string())]);
                match inject::decide(&pod, &namespace, &labels) {
                    Err(skip) => report.push(format!("{kind} {name}: skipped, {skip}")),
                    Ok(()) => {
                        let injected = inject::mutate(&pod, cfg, native).map_err(|source| ManualError::Inject {
                            index,
                            kind: kind.clone(),
                            name: name.clone(),
                            source,
                        })?;
                        let v = serde_json::to_value(&injected).map_err(|e| template_err(e.to_string()))?;
                        if let Some(obj) = template.as_object_mut() {
                            obj.insert("metadata".into(), v["metadata"].clone());
                            obj.insert("spec".into(), v["spec"].clone());
                        }
                        report.push(format!("{kind} {name}: injected"));
                    }
                }
            }
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&value).map_err(|e| ManualError::Yaml {
            index,
            reason: e.to_string(),
        })?);
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: app, image: web}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 0 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: job, image: job}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: demo}
spec:
  hostNetwork: true
  containers: [{name: app, image: x}]
"#;

    #[test]
    fn injects_templates_and_passes_the_rest() {
        let (out, report) = inject_documents(INPUT, &InjectConfig::default(), true).expect("ok");
        assert_eq!(
            report,
            [
                "Deployment web: injected",
                "CronJob nightly: injected",
                "Service web: passed through",
                "Pod host: skipped, pod uses the host network"
            ]
        );
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&out)
            .map(|d| serde_json::Value::deserialize(d).expect("yaml"))
            .collect();
        assert_eq!(docs.len(), 4);
        let inits = &docs[0]["spec"]["template"]["spec"]["initContainers"];
        assert_eq!(inits[0]["name"], "mizzen-init");
        assert_eq!(inits[1]["name"], "mizzen-proxy");
        assert_eq!(
            docs[0]["spec"]["selector"]["matchLabels"]["app"], "web",
            "the rest of the object is kept"
        );
        let job = &docs[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(
            job["initContainers"][1]["restartPolicy"], "Always",
            "Jobs complete with a native sidecar"
        );
        assert_eq!(docs[2]["kind"], "Service");
        assert!(docs[3]["spec"]["initContainers"].is_null());
        // Injecting the output again changes nothing.
        let (again, report) = inject_documents(&out, &InjectConfig::default(), true).expect("ok");
        assert_eq!(again, out);
        assert!(report[0].contains("already injected"), "{report:?}");
    }

    #[test]
    fn errors_name_the_document() {
        let bad = "kind: Pod\nmetadata: {name: p, annotations: {mizzen.dev/log-level: loud}}\nspec: {containers: [{name: a, image: a}]}\n";
        let err = inject_documents(bad, &InjectConfig::default(), true).expect_err("bad annotation");
        assert!(
            err.to_string().contains("Pod p") && err.to_string().contains("mizzen.dev/log-level"),
            "{err}"
        );
        assert!(inject_documents("a: [", &InjectConfig::default(), true).is_err());
    }
}
