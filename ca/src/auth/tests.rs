use super::*;

fn reviewed(ns: &str, sa: &str, node: Option<&str>) -> Reviewed {
    Reviewed {
        namespace: ns.into(),
        service_account: sa.into(),
        pod_name: None,
        pod_uid: None,
        node_name: node.map(Into::into),
        expires_at: None,
    }
}

#[test]
fn authorization_decisions() {
    let policy = Policy {
        trust_domain: TrustDomain::default(),
        trusted_agents: vec!["mizzen-system/mizzen-agent".into()],
        allow_direct: false,
    };
    let agent_a = reviewed("mizzen-system", "mizzen-agent", Some("node-a"));
    let agent_nowhere = reviewed("mizzen-system", "mizzen-agent", None);
    let impostor = reviewed("demo", "mizzen-agent", Some("node-a"));
    let web_a = reviewed("demo", "web", Some("node-a"));
    let web_b = reviewed("demo", "web", Some("node-b"));
    let web_unbound = reviewed("demo", "web", None);
    let want = Ok("spiffe://cluster.local/ns/demo/sa/web".parse().expect("id"));

    assert_eq!(authorize(&web_a, Some(&agent_a), &policy), want);
    assert_eq!(
        authorize(&web_unbound, Some(&agent_a), &policy),
        Err(Denied::NotPodBound("demo/web".into())),
        "a minted token without a pod is refused through an agent"
    );
    assert_eq!(authorize(&web_a, None, &policy), Err(Denied::DirectNotAllowed));
    assert_eq!(
        authorize(&web_a, Some(&impostor), &policy),
        Err(Denied::UntrustedAgent("demo/mizzen-agent".into()))
    );
    assert_eq!(
        authorize(&web_b, Some(&agent_a), &policy),
        Err(Denied::NodeMismatch {
            workload: "node-b".into(),
            agent: "node-a".into()
        })
    );
    assert_eq!(
        authorize(&web_a, Some(&agent_nowhere), &policy),
        Err(Denied::AgentNodeUnknown {
            workload: "node-a".into()
        })
    );
    let direct = Policy {
        allow_direct: true,
        ..policy
    };
    assert_eq!(authorize(&web_b, None, &direct), want);
}
