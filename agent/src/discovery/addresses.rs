//! Which Services an address belongs to (as a cluster IP or an endpoint),
//! for clients that subscribe to `address/<ip>` on first use of a
//! destination ([`crate::xds::StreamState`]). Kept as a persistent map, so
//! each snapshot shares it for the cost of a pointer.

use std::collections::HashMap;
use std::net::IpAddr;

use mizzen_api::proto::discovery as pb;

/// Address → names of the Services that list it (sorted; usually one:
/// a small vector, where a persistent set would take a whole tree node).
pub type ByAddress = imbl::OrdMap<IpAddr, Vec<String>>;

/// [`ByAddress`], updated Service by Service.
#[derive(Debug, Default)]
pub struct Addresses {
    by_address: ByAddress,
    of_service: HashMap<String, Vec<IpAddr>>,
}

/// A Service's cluster IPs and its endpoints' addresses.
fn addresses_of(svc: &pb::Service) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = svc
        .cluster_ips
        .iter()
        .chain(svc.endpoints.iter().flat_map(|e| e.addresses.iter()))
        .filter_map(|a| a.parse().ok())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

impl Addresses {
    /// Records Service `name` as `svc` (`None`: it is gone).
    pub fn update(&mut self, name: &str, svc: Option<&pb::Service>) {
        for ip in self.of_service.remove(name).unwrap_or_default() {
            let emptied = self.by_address.get_mut(&ip).is_some_and(|names| {
                names.retain(|n| n != name);
                names.is_empty()
            });
            if emptied {
                self.by_address.remove(&ip);
            }
        }
        let ips = svc.map(addresses_of).unwrap_or_default();
        for ip in &ips {
            let names = self.by_address.entry(*ip).or_default();
            if let Err(at) = names.binary_search_by(|n| n.as_str().cmp(name)) {
                names.insert(at, name.to_owned());
            }
        }
        if !ips.is_empty() {
            self.of_service.insert(name.to_owned(), ips);
        }
    }

    /// The map as it stands (shared, not copied).
    pub fn snapshot(&self) -> ByAddress {
        self.by_address.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(vip: &str, endpoints: &[&str]) -> pb::Service {
        pb::Service {
            cluster_ips: vec![vip.into()],
            endpoints: endpoints
                .iter()
                .map(|a| pb::Endpoint {
                    addresses: vec![(*a).into()],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn names(a: &Addresses, ip: &str) -> Vec<String> {
        let ip: IpAddr = ip.parse().expect("ip");
        a.snapshot().get(&ip).map(|s| s.to_vec()).unwrap_or_default()
    }

    #[test]
    fn addresses_follow_their_services() {
        let mut a = Addresses::default();
        a.update("demo/web", Some(&svc("10.0.0.10", &["10.200.0.3"])));
        a.update("demo/api", Some(&svc("10.0.0.11", &["10.200.0.3"])));
        assert_eq!(names(&a, "10.0.0.10"), ["demo/web"]);
        assert_eq!(
            names(&a, "10.200.0.3"),
            ["demo/api", "demo/web"],
            "a pod behind two Services"
        );
        let before = a.snapshot();
        a.update("demo/web", Some(&svc("10.0.0.10", &["10.200.0.4"])));
        assert_eq!(names(&a, "10.200.0.3"), ["demo/api"]);
        assert_eq!(names(&a, "10.200.0.4"), ["demo/web"]);
        a.update("demo/api", None);
        assert!(names(&a, "10.0.0.11").is_empty() && names(&a, "10.200.0.3").is_empty());
        assert_eq!(
            before
                .get(&"10.200.0.3".parse::<IpAddr>().expect("ip"))
                .map(|s| s.len()),
            Some(2),
            "an earlier snapshot is unchanged"
        );
    }
}
