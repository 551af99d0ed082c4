//! `os::sysctl` against a real kernel, inside a namespace of our own (root required).

use tsunagu_engine::os::sysctl::Forwarding;
use tsunagu_lab::{Lab, Netns};

const V4: &str = "net.ipv4.ip_forward";
const V6: &str = "net.ipv6.conf.all.forwarding";

fn values(ns: &Netns) -> (String, String) {
    (ns.sysctl_get(V4).unwrap(), ns.sysctl_get(V6).unwrap())
}

fn host_values() -> (String, String) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    (
        read("/proc/sys/net/ipv4/ip_forward"),
        read("/proc/sys/net/ipv6/conf/all/forwarding"),
    )
}

#[test]
fn forwarding_is_enabled_and_restored_in_the_namespace_only() {
    let mut lab = Lab::new("os_sysctl_restore").unwrap();
    let ns = lab.add_ns("node").unwrap();
    let host_before = host_values();

    for (v4, v6) in [("0", "0"), ("1", "0"), ("0", "1")] {
        ns.sysctl(V4, v4).unwrap();
        ns.sysctl(V6, v6).unwrap();
        let fwd = ns.run(Forwarding::enable).unwrap().unwrap();
        assert_eq!(values(&ns), ("1".into(), "1".into()));
        let previous: Vec<&str> = fwd.previous().iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(previous, [v4, v6]);
        ns.run(move || fwd.restore()).unwrap().unwrap();
        assert_eq!(values(&ns), (v4.into(), v6.into()));
    }
    // The namespace's files, not the host's.
    assert_eq!(host_values(), host_before);
}
