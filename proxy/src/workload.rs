//! Workload names for metrics labels: a pod's owner as users name it (the
//! Deployment, not the generated pod), bounded in number however many
//! times pods are replaced.
//!
//! The name is taken from the pod's own name the way controllers build it:
//! a ReplicaSet's pod is `<deployment>-<template hash>-<5 random>`, a
//! DaemonSet's or Job's `<owner>-<5 random>`, a StatefulSet's
//! `<owner>-<ordinal>`. The random parts use Kubernetes' alphabet
//! (`bcdfghjklmnpqrstvwxz2456789`). A bare pod keeps its name.

const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn generated(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.bytes().all(|b| ALPHABET.contains(&b))
}

/// The workload a pod named `pod` belongs to.
pub fn of_pod(pod: &str) -> &str {
    let Some((rest, last)) = pod.rsplit_once('-') else {
        return pod;
    };
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty() {
        return rest; // StatefulSet ordinal
    }
    if !generated(last, 5, 5) || rest.is_empty() {
        return pod;
    }
    match rest.rsplit_once('-') {
        Some((deployment, hash)) if !deployment.is_empty() && generated(hash, 6, 10) => deployment,
        _ => rest,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn owners_are_recovered_from_generated_names() {
        let table = [
            ("reviews-v1-7f6b5c9d4f-x2x7q", "reviews-v1"),
            ("web-5d4c7b6f9-abcde", "web-5d4c7b6f9-abcde"), // 'a','e' are not in the alphabet
            ("web-5d4c7b6f9-bcdfg", "web"),
            ("node-agent-zx7kq", "node-agent"),
            ("db-0", "db"),
            ("db-12", "db"),
            ("client", "client"),
            ("my-pod", "my-pod"),
            ("-", "-"),
        ];
        for (pod, want) in table {
            assert_eq!(super::of_pod(pod), want, "{pod}");
        }
    }
}
