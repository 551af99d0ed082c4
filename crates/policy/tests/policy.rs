use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use tsunagu_policy::{
    ErrorKind, FilterRule, NetPortRange, Policy, PolicyError, PolicyNode, fuzz_parse,
};

fn node(id: i64, user: Option<&str>, tags: &[&str], ips: &[&str], routes: &[&str]) -> PolicyNode {
    PolicyNode {
        id,
        user: user.map(str::to_string),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ips: ips.iter().map(|i| i.parse::<IpAddr>().unwrap()).collect(),
        approved_routes: routes.iter().map(|r| r.parse::<IpNet>().unwrap()).collect(),
    }
}

fn npr(ip: &str, first: u16, last: u16) -> NetPortRange {
    NetPortRange {
        ip: ip.to_string(),
        first,
        last,
    }
}

fn rule(src: &[&str], dst: Vec<NetPortRange>) -> FilterRule {
    FilterRule {
        src_ips: src.iter().map(|s| s.to_string()).collect(),
        dst_ports: dst,
        ip_proto: vec![],
    }
}

fn err(text: &str) -> PolicyError {
    match Policy::parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// 1-based line/column of the first occurrence of `needle` (test helper).
fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let off = text.find(needle).expect("needle present");
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() + 1;
    (line, col)
}

fn assert_err_at(text: &str, needle: &str, reason_part: &str) {
    let e = err(text);
    assert_eq!(e.kind, ErrorKind::Semantic, "{e}");
    assert_eq!((e.line, e.column), pos_of(text, needle), "{e}");
    assert!(e.reason.contains(reason_part), "{e}");
}

// ---------------------------------------------------------------- errors

#[test]
fn syntax_error_has_exact_position() {
    // Missing comma between two properties on line 3.
    let text = "{\n  \"acls\": [\n    {\"action\": \"accept\" \"src\": [\"*\"], \"dst\": [\"*:*\"]},\n  ],\n}";
    let e = err(text);
    assert_eq!(e.kind, ErrorKind::Syntax);
    assert_eq!((e.line, e.column), (3, 24), "{e}");
    assert!(e.reason.contains("comma"), "{e}");

    let e = err("{\n  \"groups\": {\n    \"group:a\": [\"alice\"\n  },\n}");
    assert_eq!(e.kind, ErrorKind::Syntax);
    assert_eq!(e.line, 4, "{e}");
}

#[test]
fn unknown_group_position() {
    let text = r#"{
  "groups": { "group:family": ["alice"] },
  "acls": [
    { "action": "accept", "src": ["group:famly"], "dst": ["*:*"] },
  ],
}"#;
    let e = err(text);
    assert_eq!(
        (e.line, e.column, e.kind),
        (4, 35, ErrorKind::Semantic),
        "{e}"
    );
    assert!(e.reason.contains("unknown group \"group:famly\""), "{e}");
    assert_eq!(
        e.to_string(),
        "policy error at line 4, column 35: unknown group \"group:famly\" (not defined in \"groups\")"
    );
}

#[test]
fn tag_without_owner_position() {
    let text = r#"{
  "tagOwners": { "tag:exit": ["admin"] },
  "acls": [
    { "action": "accept", "src": ["*"],
      "dst": ["tag:exit:*", "tag:printer:9100"] },
  ],
}"#;
    let e = err(text);
    assert_eq!((e.line, e.column), (5, 29), "{e}");
    assert!(
        e.reason
            .contains("tag \"tag:printer\" has no tagOwners entry"),
        "{e}"
    );
}

#[test]
fn other_semantic_errors_are_positioned() {
    let acl = |dst: &str| {
        format!(
            "{{\n  \"acls\": [\n    {{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"{dst}\"]}}\n  ]\n}}"
        )
    };
    for (dst, why) in [
        ("*:9-1", "backwards"),
        ("*:70000", "out of range"),
        ("*:ssh", "not a port number"),
        ("*:", "not a port number"),
        ("nas", "must have the form"),
        ("autogroup:admin:*", "unknown or unsupported autogroup"),
        ("autogroup:bogus:22", "unknown or unsupported autogroup"),
        ("198.18.5.0/33:22", "invalid CIDR"),
        ("198.18.5.1/24:22", "host bits set"),
        ("300.1.2.3:22", "invalid IP address"),
        ("grup:x:22", "unknown selector"),
    ] {
        let text = acl(dst);
        assert_err_at(&text, &format!("\"{dst}\""), why);
    }
    assert_err_at(
        "{\n  \"acls\": [],\n  \"bogus\": 1\n}",
        "\"bogus\"",
        "unknown top-level key",
    );
    assert_err_at(
        "{\n  // new syntax\n  \"grants\": []\n}",
        "\"grants\"",
        "not supported",
    );
    assert_err_at(
        "{\"acls\": [{\"action\": \"accept\", \"src\": [\"autogroup:internet\"], \"dst\": [\"*:*\"]}]}",
        "\"autogroup:internet\"",
        "only be used as a destination",
    );
    assert_err_at(
        "{\"acls\": [{\"action\": \"drop\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}",
        "\"drop\"",
        "unsupported action",
    );
    assert_err_at(
        "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"ports\": []}]}",
        "\"ports\"",
        "not both",
    );
    assert_err_at(
        "{\"acls\": [{\"action\": \"accept\", \"proto\": \"icmp\", \"src\": [\"*\"], \"dst\": [\"*:22\"]}]}",
        "\"*:22\"",
        "ports can only be restricted",
    );
    assert_err_at(
        "{\"hosts\": {\"nas\": \"198.18.1.300\"}}",
        "\"198.18.1.300\"",
        "invalid IP",
    );
    assert_err_at(
        "{\"groups\": {\"group:a\": [\"alice\", \"group:b\"]}}",
        "\"group:b\"",
        "cannot contain other groups",
    );
    assert_err_at(
        "{\"groups\": {\"a\": []}}",
        "\"a\"",
        "must start with \"group:\"",
    );
    assert_err_at(
        "{\"groups\": {\"group:a\": []}, \"groups\": {}}",
        "\"groups\": {}",
        "duplicate key",
    );
    assert_err_at(
        "{\"tagOwners\": {\"tag:x\": [\"autogroup:admin\"]}}",
        "\"autogroup:admin\"",
        "unsupported tag owner",
    );
    assert_err_at(
        "{\"tagOwners\": {\"tag:x\": [\"tag:y\"]}}",
        "\"tag:y\"",
        "has no tagOwners entry",
    );
    assert_err_at(
        "{\"autoApprovers\": {\"routes\": {\"198.18.0.0/15\": [\"198.18.1.1\"]}}}",
        "\"198.18.1.1\"",
        "cannot be an auto approver",
    );
    assert_err_at(
        "{\"autoApprovers\": {\"routes\": {\"198.18.5.0/33\": []}}}",
        "\"198.18.5.0/33\"",
        "invalid CIDR",
    );
    assert_err_at(
        "{\"acls\": [{\"action\": \"accept\", \"src\": [\"tag:x\"], \"dst\": [\"autogroup:self:*\"]}], \"tagOwners\": {\"tag:x\": []}}",
        "\"tag:x\"",
        "autogroup:self",
    );
    // Non-object root and empty file.
    assert_eq!(err("[]").kind, ErrorKind::Semantic);
    assert_eq!((err("  // nothing\n").line, err("").column), (1, 1));
}

#[test]
fn position_counts_characters_not_bytes() {
    let text = "{\"hosts\": {\"nas\": \"1.2.3.4\"}, /* é日本 */ \"x\": 1}";
    let e = err(text);
    // Column 41 counts characters; the byte offset is 45.
    assert_eq!(text.find("\"x\"").unwrap(), 45);
    assert_eq!((e.line, e.column), (1, 41), "{e}");
}

#[test]
fn hujson_comments_and_trailing_commas() {
    let text = r#"
// Family network.
{
  /* block comment */
  "groups": {
    "group:family": ["alice", "bob@",], // trailing comma in array
  },
  "ACLs": [ // Tailscale's legacy capitalisation is accepted
    {
      "Action": "accept",
      "users": ["group:family",],    // legacy field names
      "ports": ["*:*",],
    },
  ],
}
"#;
    let p = Policy::parse(text).unwrap();
    let c = p.compile(&[
        node(1, Some("alice"), &[], &["100.64.0.1"], &[]),
        node(2, Some("bob"), &[], &["100.64.0.2"], &[]),
    ]);
    assert_eq!(c.visible_peers(1), vec![2]);
    // Not HuJSON: single quotes, hex, bare keys.
    for bad in ["{'acls': []}", "{\"acls\": [], \"x\": 0x1}", "{acls: []}"] {
        assert_eq!(err(bad).kind, ErrorKind::Syntax, "{bad}");
    }
}

// ---------------------------------------------------------------- scenario

const FAMILY: &str = r#"{
  "groups": {
    "group:family": ["admin", "alice"],
    "group:guests": ["guest"],
  },
  "tagOwners": {
    "tag:exit": ["admin"],
    "tag:printer": ["group:family"],
  },
  "autoApprovers": {
    "exitNode": ["tag:exit"],
  },
  "acls": [
    // Family: everything, including the internet via the exit node.
    { "action": "accept", "src": ["group:family"],
      "dst": ["group:family:*", "tag:printer:*", "autogroup:internet:*"] },
    // Guests: only the printer's raw port.
    { "action": "accept", "src": ["group:guests"], "dst": ["tag:printer:9100"] },
  ],
}"#;

fn family_nodes() -> Vec<PolicyNode> {
    vec![
        node(
            1,
            Some("alice"),
            &[],
            &["100.64.0.1", "fd7a:115c:a1e0::1"],
            &[],
        ),
        node(2, Some("admin"), &[], &["100.64.0.2"], &[]),
        node(3, Some("guest"), &[], &["100.64.0.3"], &[]),
        node(
            10,
            None,
            &["tag:exit"],
            &["100.64.0.10"],
            &["0.0.0.0/0", "::/0"],
        ),
        node(11, None, &["tag:printer"], &["100.64.0.11"], &[]),
    ]
}

#[test]
fn seed_scenario_exit_node_and_guests() {
    let p = Policy::parse(FAMILY).unwrap();
    let nodes = family_nodes();
    let c = p.compile(&nodes);

    // Guest: no internet, sees only the printer (not the exit node).
    assert!(!c.may_use_exit_nodes(3));
    assert_eq!(c.visible_peers(3), vec![11]);
    // Family members: internet, see each other, the printer and the exit node.
    assert!(c.may_use_exit_nodes(1));
    assert!(c.may_use_exit_nodes(2));
    assert_eq!(c.visible_peers(1), vec![2, 10, 11]);
    assert_eq!(c.visible_peers(2), vec![1, 10, 11]);
    // Tagged nodes initiate nothing but see who may reach them.
    assert!(!c.may_use_exit_nodes(10));
    assert_eq!(c.visible_peers(10), vec![1, 2]);
    assert_eq!(c.visible_peers(11), vec![1, 2, 3]);
    assert!(c.filter(3).is_empty(), "nobody may reach the guest");

    // Auto-approval and tag ownership.
    assert!(p.auto_approve_exit_node(&nodes[3]));
    assert!(!p.auto_approve_exit_node(&nodes[0]));
    assert!(p.auto_approve_route(&nodes[3], "0.0.0.0/0".parse().unwrap()));
    assert!(!p.auto_approve_route(&nodes[3], "198.18.0.0/15".parse().unwrap()));
    assert!(p.tag_allowed("admin", "tag:exit"));
    assert!(p.tag_allowed("admin@", "tag:exit"));
    assert!(!p.tag_allowed("alice", "tag:exit"));
    assert!(p.tag_allowed("alice", "tag:printer"), "via group:family");
    assert!(!p.tag_allowed("guest", "tag:printer"));
    assert!(!p.tag_allowed("admin", "tag:unknown"));
}

#[test]
fn seed_scenario_filters_are_exact() {
    let c = Policy::parse(FAMILY).unwrap().compile(&family_nodes());

    // Printer: family on all ports, guests on 9100 only.
    assert_eq!(
        c.filter(11),
        vec![
            rule(
                &["100.64.0.1", "100.64.0.2", "fd7a:115c:a1e0::1"],
                vec![npr("100.64.0.11", 0, 65535)]
            ),
            rule(&["100.64.0.3"], vec![npr("100.64.0.11", 9100, 9100)]),
        ]
    );
    // Alice's device: reachable by the family (incl. her own devices) on
    // both of its addresses.
    assert_eq!(
        c.filter(1),
        vec![rule(
            &["100.64.0.1", "100.64.0.2", "fd7a:115c:a1e0::1"],
            vec![
                npr("100.64.0.1", 0, 65535),
                npr("fd7a:115c:a1e0::1", 0, 65535)
            ]
        )]
    );
    // Exit node: the family may send to internet prefixes (not to private
    // ranges or the tailnet) through it.
    let exit = c.filter(10);
    assert_eq!(exit.len(), 1);
    let dsts: Vec<&str> = exit[0].dst_ports.iter().map(|d| d.ip.as_str()).collect();
    assert!(dsts.contains(&"8.0.0.0/7"), "{dsts:?}");
    assert!(dsts.contains(&"2000::/3"), "{dsts:?}");
    assert!(
        !dsts
            .iter()
            .any(|d| d.starts_with("10.") || d.starts_with("100.64."))
    );
    assert!(
        exit[0]
            .dst_ports
            .iter()
            .all(|d| (d.first, d.last) == (0, 65535))
    );
}

#[test]
fn exit_node_seen_when_reachable_for_another_reason() {
    // Guests may ping the exit node itself: it becomes a visible peer, but
    // they still may not use it as an exit node.
    let text = FAMILY.replace(
        r#""dst": ["tag:printer:9100"] },"#,
        r#""dst": ["tag:printer:9100", "tag:exit:*"] },"#,
    );
    let c = Policy::parse(&text).unwrap().compile(&family_nodes());
    assert_eq!(c.visible_peers(3), vec![10, 11]);
    assert!(!c.may_use_exit_nodes(3));
}

#[test]
fn exit_nodes_get_the_rules_of_addresses_they_forward_to() {
    // alice: the internet on 443, and the exit host's own public address and LAN by
    // name; bob: one web server. The exit node forwards there, so its filter carries
    // those rules (the engine opens the exit host's own networks only to such explicit
    // rules); a node that is no exit node does not get them.
    let text = r#"{
      "tagOwners": { "tag:exit": ["alice"] },
      "acls": [
        { "action": "accept", "src": ["alice"], "dst": ["autogroup:internet:443"] },
        { "action": "accept", "src": ["alice"], "dst": ["198.51.100.2:22", "198.18.3.0/24:*"] },
        { "action": "accept", "src": ["bob"], "dst": ["203.0.113.10:80", "100.64.0.0/10:22"] },
      ],
    }"#;
    let nodes = vec![
        node(1, Some("alice"), &[], &["100.64.0.1"], &[]),
        node(2, Some("bob"), &[], &["100.64.0.2"], &[]),
        node(
            10,
            None,
            &["tag:exit"],
            &["100.64.0.10"],
            &["0.0.0.0/0", "::/0"],
        ),
        node(11, None, &["tag:exit"], &["100.64.0.11"], &[]),
    ];
    let c = Policy::parse(text).unwrap().compile(&nodes);
    let exit = c.filter(10);
    assert_eq!(exit.len(), 3, "{exit:?}");
    assert!(
        exit[0]
            .dst_ports
            .iter()
            .all(|d| (d.first, d.last) == (443, 443))
    );
    assert_eq!(
        exit[1],
        rule(
            &["100.64.0.1"],
            vec![npr("198.51.100.2", 22, 22), npr("198.18.3.0/24", 0, 65535)]
        )
    );
    // bob's tailnet-wide rule is not the exit node's to forward (it reaches the exit
    // node's own address on 22, as any node's).
    assert_eq!(
        exit[2],
        rule(
            &["100.64.0.2"],
            vec![npr("203.0.113.10", 80, 80), npr("100.64.0.0/10", 22, 22)]
        )
    );
    assert!(matches!(
        c.filter_class(10),
        tsunagu_policy::FilterClass::Node(10)
    ));
    // The unapproved exit node: only bob's rule for its tailnet address.
    assert_eq!(
        c.filter(11),
        vec![rule(&["100.64.0.2"], vec![npr("100.64.0.0/10", 22, 22)])]
    );
    // Naming a public address does not make bob an exit-node user.
    assert!(!c.may_use_exit_nodes(2) && c.may_use_exit_nodes(1));
}

// ---------------------------------------------------------------- filters

#[test]
fn ports_lists_ranges_and_wildcards() {
    let text = r#"{
  "tagOwners": { "tag:web": [] },
  "acls": [
    { "action": "accept", "src": ["alice"], "dst": ["tag:web:80,443,8000-8099"] },
    { "action": "accept", "src": ["*"], "dst": ["tag:web:22"], "proto": "tcp" },
    { "action": "accept", "src": ["bob"], "dst": ["*:*"] },
    { "action": "accept", "src": ["alice"], "dst": ["[fd7a:115c:a1e0::9]:53", "100.64.0.0/10:5353"], "proto": "udp" },
    { "action": "accept", "src": ["alice"], "dst": ["tag:web:*"], "proto": "icmp" },
  ],
}"#;
    let c = Policy::parse(text).unwrap().compile(&[
        node(1, Some("alice"), &[], &["100.64.0.1"], &[]),
        node(2, Some("bob@"), &[], &["100.64.0.2"], &[]),
        node(
            9,
            None,
            &["tag:web"],
            &["100.64.0.9", "fd7a:115c:a1e0::9"],
            &[],
        ),
    ]);
    let web = "100.64.0.9";
    let web6 = "fd7a:115c:a1e0::9";
    assert_eq!(
        c.filter(9),
        vec![
            rule(
                &["100.64.0.1"],
                vec![
                    npr(web, 80, 80),
                    npr(web, 443, 443),
                    npr(web, 8000, 8099),
                    npr(web6, 80, 80),
                    npr(web6, 443, 443),
                    npr(web6, 8000, 8099),
                ]
            ),
            FilterRule {
                src_ips: vec!["*".into()],
                dst_ports: vec![npr(web, 22, 22), npr(web6, 22, 22)],
                ip_proto: vec![6],
            },
            rule(&["100.64.0.2"], vec![npr("*", 0, 65535)]),
            FilterRule {
                src_ips: vec!["100.64.0.1".into()],
                dst_ports: vec![npr(web6, 53, 53), npr("100.64.0.0/10", 5353, 5353)],
                ip_proto: vec![17],
            },
            FilterRule {
                src_ips: vec!["100.64.0.1".into()],
                dst_ports: vec![npr(web, 0, 65535), npr(web6, 0, 65535)],
                ip_proto: vec![1],
            },
        ]
    );
    // Alice: reachable from everyone on 22? No: only tag:web has 22 open.
    // She is in 100.64.0.0/10 (5353) and under bob's "*:*".
    assert_eq!(
        c.filter(1),
        vec![
            rule(&["100.64.0.2"], vec![npr("*", 0, 65535)]),
            FilterRule {
                src_ips: vec!["100.64.0.1".into()],
                dst_ports: vec![npr("100.64.0.0/10", 5353, 5353)],
                ip_proto: vec![17],
            },
        ]
    );
    // "*" src reaches tag:web, so every node sees it and it sees every node.
    assert_eq!(c.visible_peers(9), vec![1, 2]);
    assert_eq!(c.visible_peers(1), vec![2, 9]);
    assert!(c.may_use_exit_nodes(2), "*:* includes the internet");
    assert!(!c.may_use_exit_nodes(1));
}

#[test]
fn hosts_aliases_and_subnet_routes() {
    let text = r#"{
  "hosts": {
    "nas": "198.18.2.10",
    "homelan": "198.18.2.0/24",
    "alice-laptop": "100.64.0.1",
  },
  "tagOwners": { "tag:router": ["alice"] },
  "autoApprovers": {
    "routes": { "198.18.0.0/16": ["tag:router"], "198.19.0.0/16": ["alice"] },
  },
  "acls": [
    { "action": "accept", "src": ["alice-laptop"], "dst": ["nas:445", "homelan:80"] },
  ],
}"#;
    let p = Policy::parse(text).unwrap();
    let nodes = [
        node(1, Some("alice"), &[], &["100.64.0.1"], &[]),
        node(
            2,
            None,
            &["tag:router"],
            &["100.64.0.2"],
            &["198.18.2.0/24"],
        ),
        node(3, Some("bob"), &[], &["100.64.0.3"], &[]),
    ];
    let c = p.compile(&nodes);
    assert_eq!(
        c.filter(2),
        vec![rule(
            &["100.64.0.1"],
            vec![npr("198.18.2.10", 445, 445), npr("198.18.2.0/24", 80, 80)]
        )]
    );
    assert_eq!(c.visible_peers(1), vec![2]);
    assert_eq!(c.visible_peers(2), vec![1]);
    assert!(c.visible_peers(3).is_empty());
    assert!(c.filter(1).is_empty());

    assert!(p.auto_approve_route(&nodes[1], "198.18.2.0/24".parse().unwrap()));
    assert!(p.auto_approve_route(&nodes[1], "198.18.0.0/16".parse().unwrap()));
    assert!(
        !p.auto_approve_route(&nodes[1], "192.0.0.0/8".parse().unwrap()),
        "wider than approved"
    );
    assert!(!p.auto_approve_route(&nodes[1], "198.19.1.0/24".parse().unwrap()));
    assert!(p.auto_approve_route(&nodes[0], "198.19.1.0/24".parse().unwrap()));
    assert!(!p.auto_approve_route(&nodes[2], "198.19.1.0/24".parse().unwrap()));
    assert!(!p.auto_approve_exit_node(&nodes[1]));
}

#[test]
fn autogroup_self_member_tagged() {
    let text = r#"{
  "tagOwners": { "tag:srv": [] },
  "acls": [
    { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*", "autogroup:tagged:443"] },
  ],
}"#;
    let c = Policy::parse(text).unwrap().compile(&[
        node(1, Some("alice"), &[], &["100.64.0.1"], &[]),
        node(2, Some("alice"), &[], &["100.64.0.2"], &[]),
        node(3, Some("bob"), &[], &["100.64.0.3"], &[]),
        // A tagged node that still reports a user: the tag wins.
        node(4, Some("alice"), &["tag:srv"], &["100.64.0.4"], &[]),
    ]);
    assert_eq!(c.visible_peers(1), vec![2, 4]);
    assert_eq!(c.visible_peers(3), vec![4]);
    assert_eq!(c.visible_peers(4), vec![1, 2, 3]);
    assert_eq!(
        c.filter(2),
        vec![rule(
            &["100.64.0.1", "100.64.0.2"],
            vec![npr("100.64.0.2", 0, 65535)]
        )]
    );
    assert_eq!(
        c.filter(4),
        vec![rule(
            &["100.64.0.1", "100.64.0.2/31"],
            vec![npr("100.64.0.4", 443, 443)]
        )]
    );
    assert!(!c.may_use_exit_nodes(1));
}

#[test]
fn default_policy_behaviour() {
    let p = Policy::default_policy();
    let nodes = [
        node(1, Some("alice"), &[], &["100.64.0.1"], &[]),
        node(2, Some("bob"), &[], &["100.64.0.2"], &["198.18.9.0/24"]),
        node(3, None, &["tag:exit"], &["100.64.0.3"], &["0.0.0.0/0"]),
        node(4, None, &["tag:srv"], &["100.64.0.4"], &[]),
    ];
    let c = p.compile(&nodes);
    // Members see everything and may use exit nodes.
    assert_eq!(c.visible_peers(1), vec![2, 3, 4]);
    assert!(c.may_use_exit_nodes(1) && c.may_use_exit_nodes(2));
    // Tagged nodes see members (who may reach them) but not each other.
    assert_eq!(c.visible_peers(4), vec![1, 2]);
    assert!(!c.may_use_exit_nodes(4));
    let members_to_any = vec![rule(
        &["100.64.0.1", "100.64.0.2"],
        vec![npr("*", 0, 65535)],
    )];
    assert_eq!(c.filter(4), members_to_any);
    assert_eq!(c.filter(2), members_to_any, "incl. its subnet");
    // No tagOwners, no autoApprovers: nothing is automatic.
    assert!(!p.tag_allowed("alice", "tag:srv"));
    assert!(!p.auto_approve_exit_node(&nodes[2]));
}

#[test]
fn unknown_viewer_gets_nothing() {
    let c = Policy::default_policy().compile(&[]);
    assert!(c.filter(7).is_empty());
    assert!(c.visible_peers(7).is_empty());
    assert!(!c.may_use_exit_nodes(7));
}

// ---------------------------------------------------------------- robustness

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn parse_never_panics_on_mutated_inputs() {
    let seeds = [
        FAMILY,
        tsunagu_policy::DEFAULT_POLICY,
        r#"{"hosts":{"nas":"198.18.2.10"},"tagOwners":{"tag:x":["autogroup:member"]},"acls":[{"action":"accept","src":["nas","tag:x"],"dst":["[fd7a::1]:1-2,3","autogroup:self:*"]}],"autoApprovers":{"routes":{"198.18.0.0/15":["tag:x"]}}}"#,
    ];
    let tokens: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "//",
        "/*",
        "*/",
        "*",
        "group:",
        "tag:",
        "autogroup:",
        "self",
        "internet",
        "/0",
        "/33",
        "::",
        "-",
        "65536",
        "é",
        "\\u0000",
        "\\",
        "\n",
        "\r",
        "1.2.3.4",
        "fd7a::",
        "@",
        "null",
        "true",
        "0x1",
        "'",
    ];
    let mut rng = XorShift(0x5eed_1234_abcd_0001);
    let mut parsed_ok = 0;
    let total = 4000;
    for i in 0..total {
        let mut s: String = seeds[i % seeds.len()].to_string();
        for _ in 0..1 + rng.below(4) {
            let mut cut = rng.below(s.len() + 1);
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            match rng.below(4) {
                0 => s.insert_str(cut, tokens[rng.below(tokens.len())]),
                1 => {
                    let mut end = (cut + 1 + rng.below(8)).min(s.len());
                    while !s.is_char_boundary(end) {
                        end += 1;
                    }
                    s.replace_range(cut..end, "");
                }
                2 => s.truncate(cut),
                _ => {
                    let c = char::from_u32(rng.below(0x3000) as u32).unwrap_or('?');
                    s.insert(cut, c);
                }
            }
        }
        match Policy::parse(&s) {
            Ok(_) => parsed_ok += 1,
            Err(e) => {
                assert!(e.line >= 1 && e.column >= 1);
                assert!(e.line <= s.split('\n').count() + s.matches('\r').count());
            }
        }
        fuzz_parse(s.as_bytes());
    }
    // Purely random bytes, too.
    for _ in 0..2000 {
        let len = rng.below(64);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        fuzz_parse(&bytes);
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = Policy::parse(s);
        }
    }
    println!("mutated inputs: {parsed_ok}/{total} still valid policies");
    assert!(parsed_ok > 0 && parsed_ok < total);
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let text = "[".repeat(100_000);
    assert_eq!(err(&text).kind, ErrorKind::Syntax);
}

// ---------------------------------------------------------------- scale

#[test]
fn compile_5000_nodes_timing() {
    let text = r#"{
  "groups": {
    "group:eng": ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9"],
    "group:ops": ["u10", "u11", "u12"],
  },
  "tagOwners": { "tag:srv": ["group:ops"], "tag:exit": ["group:ops"], "tag:db": ["group:ops"] },
  "hosts": { "lan": "198.18.0.0/16" },
  "acls": [
    { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*", "tag:srv:80,443"] },
    { "action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432", "lan:*", "autogroup:internet:*"] },
    { "action": "accept", "src": ["group:ops"], "dst": ["*:*"] },
    { "action": "accept", "src": ["tag:srv"], "dst": ["tag:db:5432"] },
  ],
}"#;
    let p = Policy::parse(text).unwrap();
    let n = 5000usize;
    let nodes: Vec<PolicyNode> = (0..n)
        .map(|i| {
            let ip = format!("100.64.{}.{}", i / 250, i % 250 + 1);
            let v6 = format!("fd7a:115c:a1e0::{:x}", i + 1);
            match i % 10 {
                0 => node(i as i64, None, &["tag:srv"], &[&ip, &v6], &[]),
                1 if i % 100 == 1 => node(
                    i as i64,
                    None,
                    &["tag:exit"],
                    &[&ip, &v6],
                    &["0.0.0.0/0", "::/0"],
                ),
                2 if i % 50 == 2 => {
                    node(i as i64, None, &["tag:db"], &[&ip, &v6], &["198.18.9.0/24"])
                }
                _ => {
                    let user = format!("u{}", i % 500);
                    node(i as i64, Some(&user), &[], &[&ip, &v6], &[])
                }
            }
        })
        .collect();
    let t = Instant::now();
    let c = p.compile(&nodes);
    let compile = t.elapsed();
    let t = Instant::now();
    let mut peers = 0usize;
    let mut rules = 0usize;
    for node in &nodes {
        peers += c.visible_peers(node.id).len();
        rules += c.filter(node.id).len();
    }
    let all_maps = t.elapsed();
    println!(
        "5000 nodes: compile {compile:?}; visible_peers+filter for all nodes {all_maps:?} ({peers} peer entries, {rules} filter rules)"
    );
    assert_eq!(c.node_count(), n);
    assert!(c.may_use_exit_nodes(3), "u3 is in group:eng");
    assert!(c.may_use_exit_nodes(11), "u11 is in group:ops");
    assert!(!c.may_use_exit_nodes(23), "u23 is in neither");
}

#[test]
fn can_see_agrees_with_visible_peers() {
    let p = Policy::parse(
        r#"{
  "groups": { "group:family": ["alice", "bob"], "group:guests": ["carol"] },
  "tagOwners": { "tag:exit": ["alice"], "tag:printer": ["alice"] },
  "acls": [
    { "action": "accept", "src": ["group:family"], "dst": ["*:*"] },
    { "action": "accept", "src": ["group:guests"], "dst": ["tag:printer:9100"] },
    { "action": "accept", "src": ["carol"], "dst": ["autogroup:self:22"] },
  ],
}"#,
    )
    .unwrap();
    let nodes = vec![
        node(1, Some("alice"), &[], &["100.64.0.1"], &[]),
        node(2, Some("bob"), &[], &["100.64.0.2"], &[]),
        node(3, Some("carol"), &[], &["100.64.0.3"], &[]),
        node(4, Some("carol"), &[], &["100.64.0.4"], &[]),
        node(
            5,
            None,
            &["tag:exit"],
            &["100.64.0.5"],
            &["0.0.0.0/0", "::/0"],
        ),
        node(6, None, &["tag:printer"], &["100.64.0.6"], &[]),
    ];
    let c = p.compile(&nodes);
    for v in 1..=6 {
        let visible = c.visible_peers(v);
        for peer in 1..=7 {
            assert_eq!(
                c.can_see(v, peer),
                visible.contains(&peer),
                "viewer {v}, peer {peer}"
            );
        }
    }
    assert!(
        c.can_see(3, 6) && !c.can_see(3, 5),
        "a guest sees the printer, not the exit node"
    );
    assert!(c.can_see(3, 4), "autogroup:self");
}

#[test]
fn equal_filter_classes_mean_equal_filters() {
    let p = Policy::parse(
        r#"{
  "groups": { "group:family": ["alice", "bob"], "group:guests": ["carol"] },
  "tagOwners": { "tag:exit": ["alice"], "tag:printer": ["alice"] },
  "acls": [
    { "action": "accept", "src": ["group:family"], "dst": ["*:*"] },
    { "action": "accept", "src": ["group:guests"], "dst": ["tag:printer:9100"] },
    { "action": "accept", "src": ["carol"], "dst": ["autogroup:self:22"] },
    { "action": "accept", "src": ["autogroup:tagged"], "dst": ["*:443"] },
  ],
}"#,
    )
    .unwrap();
    let nodes = vec![
        node(1, Some("alice"), &[], &["100.64.0.1"], &[]),
        node(2, Some("bob"), &[], &["100.64.0.2"], &[]),
        node(3, Some("carol"), &[], &["100.64.0.3"], &[]),
        node(4, Some("carol"), &[], &["100.64.0.4"], &[]),
        node(
            5,
            None,
            &["tag:exit"],
            &["100.64.0.5"],
            &["0.0.0.0/0", "::/0"],
        ),
        node(6, None, &["tag:printer"], &["100.64.0.6"], &[]),
        node(7, None, &["tag:exit"], &["100.64.0.7"], &[]),
    ];
    for c in [p.compile(&nodes), Policy::default_policy().compile(&nodes)] {
        for a in 1..=8 {
            for b in 1..=8 {
                if c.filter_class(a) == c.filter_class(b) {
                    assert_eq!(c.filter(a), c.filter(b), "viewers {a} and {b}");
                }
            }
        }
    }
    let c = Policy::default_policy().compile(&nodes);
    assert_eq!(
        c.filter_class(1),
        c.filter_class(6),
        "the default policy gives everyone the same filter"
    );
    let c = p.compile(&nodes);
    assert_ne!(c.filter_class(3), c.filter_class(4), "autogroup:self");
}
