//! HuJSON text -> validated [`PolicyData`], with positions for every error.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use jsonc_parser::ast::{Array, Object, ObjectProp, Value};
use jsonc_parser::common::Ranged;
use jsonc_parser::{CollectOptions, ParseOptions, parse_to_ast};

use crate::error::{ErrorKind, PolicyError};
use crate::model::{Acl, Alias, AutoApprovers, Dst, Owner, PolicyData, PortRange, canonical_user};

type R<T> = Result<T, PolicyError>;

/// Top-level keys that Tailscale defines but tsunagu does not implement. They
/// are rejected (not ignored) so that nobody believes e.g. an SSH rule or a
/// `tests` assertion is in force when it is not.
const UNSUPPORTED_TOP: &[&str] = &[
    "grants",
    "ssh",
    "tests",
    "sshtests",
    "nodeattrs",
    "postures",
    "defaultsrcposture",
    "ipsets",
    "derpmap",
    "disableipv4",
    "onecgnatroute",
    "randomizeclientport",
    "attrconfig",
];

/// HuJSON = JSON + comments + trailing commas; everything else jsonc-parser
/// would tolerate (single quotes, hex, bare keys, missing commas...) is off.
fn hujson_options() -> ParseOptions {
    ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    }
}

pub(crate) fn parse_policy(text: &str) -> R<PolicyData> {
    let parsed =
        parse_to_ast(text, &CollectOptions::default(), &hujson_options()).map_err(|e| {
            PolicyError {
                line: e.line_display(),
                column: e.column_display(),
                reason: e.kind().to_string(),
                kind: ErrorKind::Syntax,
            }
        })?;
    let Some(root) = parsed.value else {
        return Err(PolicyError::at(
            text,
            0,
            "empty policy file: expected a JSON object",
        ));
    };
    let mut p = Parser {
        text,
        hosts: BTreeMap::new(),
        groups: BTreeMap::new(),
        tags: BTreeSet::new(),
    };
    p.policy(&root)
}

struct Parser<'t> {
    text: &'t str,
    hosts: BTreeMap<String, IpNet>,
    groups: BTreeMap<String, Vec<String>>,
    tags: BTreeSet<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Src,
    Dst,
    Approver,
}

impl<'t> Parser<'t> {
    fn err<T>(&self, offset: usize, reason: impl Into<String>) -> R<T> {
        Err(PolicyError::at(self.text, offset, reason))
    }

    fn object<'a, 'v>(&self, v: &'v Value<'a>, what: &str) -> R<&'v Object<'a>> {
        match v {
            Value::Object(o) => Ok(o),
            _ => self.err(v.start(), format!("{what} must be an object")),
        }
    }

    fn array<'a, 'v>(&self, v: &'v Value<'a>, what: &str) -> R<&'v Array<'a>> {
        match v {
            Value::Array(a) => Ok(a),
            _ => self.err(v.start(), format!("{what} must be an array")),
        }
    }

    fn string<'v>(&self, v: &'v Value<'_>, what: &str) -> R<&'v str> {
        match v {
            Value::StringLit(s) => Ok(s.value.as_ref()),
            _ => self.err(v.start(), format!("{what} must be a string")),
        }
    }

    /// Array of strings, each with its byte offset.
    fn strings<'v>(&self, v: &'v Value<'_>, what: &str) -> R<Vec<(&'v str, usize)>> {
        self.array(v, what)?
            .elements
            .iter()
            .map(|e| Ok((self.string(e, &format!("each entry of {what}"))?, e.start())))
            .collect()
    }

    /// Properties of a schema object, keyed case-insensitively (Tailscale's Go
    /// decoder matches field names case-insensitively: `"ACLs"` works), with
    /// duplicates rejected.
    fn props<'a, 'o>(&self, o: &'o Object<'a>) -> R<Vec<(String, &'o ObjectProp<'a>)>> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(o.properties.len());
        for prop in &o.properties {
            let key = prop.name.as_str().to_ascii_lowercase();
            if !seen.insert(key.clone()) {
                return self.err(
                    prop.name.start(),
                    format!("duplicate key \"{}\"", prop.name.as_str()),
                );
            }
            out.push((key, prop));
        }
        Ok(out)
    }

    /// Data-keyed object (groups, hosts...): exact keys, duplicates rejected.
    fn data_props<'a, 'o>(&self, v: &'o Value<'a>, what: &str) -> R<Vec<&'o ObjectProp<'a>>> {
        let o = self.object(v, what)?;
        let mut seen = BTreeSet::new();
        for prop in &o.properties {
            if !seen.insert(prop.name.as_str()) {
                return self.err(
                    prop.name.start(),
                    format!("duplicate key \"{}\" in {what}", prop.name.as_str()),
                );
            }
        }
        Ok(o.properties.iter().collect())
    }

    fn policy(&mut self, root: &Value<'_>) -> R<PolicyData> {
        let root = self.object(root, "the policy")?;
        let mut sections: BTreeMap<&str, &Value<'_>> = BTreeMap::new();
        for (key, prop) in self.props(root)? {
            let known = match key.as_str() {
                "groups" => "groups",
                "tagowners" => "tagowners",
                "hosts" => "hosts",
                "acls" => "acls",
                "autoapprovers" => "autoapprovers",
                k if UNSUPPORTED_TOP.contains(&k) => {
                    return self.err(
                        prop.name.start(),
                        format!(
                            "\"{}\" is not supported by tsunagu (supported sections: groups, tagOwners, hosts, acls, autoApprovers)",
                            prop.name.as_str()
                        ),
                    );
                }
                _ => {
                    return self.err(
                        prop.name.start(),
                        format!("unknown top-level key \"{}\"", prop.name.as_str()),
                    );
                }
            };
            sections.insert(known, &prop.value);
        }
        let mut data = PolicyData::default();
        // Order matters: later sections reference earlier ones.
        if let Some(v) = sections.get("hosts") {
            self.hosts(v)?;
        }
        if let Some(v) = sections.get("groups") {
            self.groups(v)?;
        }
        if let Some(v) = sections.get("tagowners") {
            data.tag_owners = self.tag_owners(v)?;
        }
        if let Some(v) = sections.get("acls") {
            for entry in &self.array(v, "\"acls\"")?.elements {
                data.acls.push(self.acl(entry)?);
            }
        }
        if let Some(v) = sections.get("autoapprovers") {
            data.auto_approvers = self.auto_approvers(v)?;
        }
        data.hosts = std::mem::take(&mut self.hosts);
        data.groups = std::mem::take(&mut self.groups);
        Ok(data)
    }

    fn hosts(&mut self, v: &Value<'_>) -> R<()> {
        for prop in self.data_props(v, "\"hosts\"")? {
            let name = prop.name.as_str();
            if let Err(why) = check_host_name(name) {
                return self.err(
                    prop.name.start(),
                    format!("invalid host name \"{name}\": {why}"),
                );
            }
            let s = self.string(&prop.value, "a host's address")?;
            match parse_prefix(s) {
                Ok(net) => {
                    self.hosts.insert(name.to_string(), net);
                }
                Err(why) => return self.err(prop.value.start(), why),
            }
        }
        Ok(())
    }

    fn groups(&mut self, v: &Value<'_>) -> R<()> {
        for prop in self.data_props(v, "\"groups\"")? {
            let name = prop.name.as_str();
            if let Err(why) = check_prefixed_name(name, "group:") {
                return self.err(
                    prop.name.start(),
                    format!("invalid group name \"{name}\": {why}"),
                );
            }
            let mut members = Vec::new();
            for (m, off) in self.strings(&prop.value, "a group's members")? {
                let reason = if m.starts_with("group:") {
                    "groups cannot contain other groups".to_string()
                } else if m.starts_with("tag:") {
                    "groups cannot contain tags".to_string()
                } else if m.starts_with("autogroup:") {
                    "groups cannot contain autogroups".to_string()
                } else if looks_like_ip(m) {
                    "groups cannot contain IP addresses".to_string()
                } else {
                    match check_user(m) {
                        Ok(u) => {
                            members.push(u.to_string());
                            continue;
                        }
                        Err(why) => why,
                    }
                };
                return self.err(off, format!("invalid group member \"{m}\": {reason}"));
            }
            members.sort();
            members.dedup();
            self.groups.insert(name.to_string(), members);
        }
        Ok(())
    }

    fn tag_owners(&mut self, v: &Value<'_>) -> R<BTreeMap<String, Vec<Owner>>> {
        let props = self.data_props(v, "\"tagOwners\"")?;
        for prop in &props {
            let name = prop.name.as_str();
            if let Err(why) = check_prefixed_name(name, "tag:") {
                return self.err(
                    prop.name.start(),
                    format!("invalid tag name \"{name}\": {why}"),
                );
            }
            self.tags.insert(name.to_string());
        }
        let mut out = BTreeMap::new();
        for prop in props {
            let mut owners = Vec::new();
            for (o, off) in self.strings(&prop.value, "a tag's owners")? {
                let owner = if o.starts_with("group:") {
                    if !self.groups.contains_key(o) {
                        return self.err(
                            off,
                            format!("unknown group \"{o}\" (not defined in \"groups\")"),
                        );
                    }
                    Owner::Group(o.to_string())
                } else if o.starts_with("tag:") {
                    if !self.tags.contains(o) {
                        return self.err(off, format!("tag \"{o}\" has no tagOwners entry"));
                    }
                    Owner::Tag(o.to_string())
                } else if o == "autogroup:member" {
                    Owner::Member
                } else if o.starts_with("autogroup:") {
                    return self.err(
                        off,
                        format!("unsupported tag owner \"{o}\" (tsunagu has no admin roles; use a user, group, tag or autogroup:member)"),
                    );
                } else {
                    match check_user(o) {
                        Ok(u) => Owner::User(u.to_string()),
                        Err(why) => {
                            return self.err(off, format!("invalid tag owner \"{o}\": {why}"));
                        }
                    }
                };
                owners.push(owner);
            }
            out.insert(prop.name.as_str().to_string(), owners);
        }
        Ok(out)
    }

    fn acl(&self, v: &Value<'_>) -> R<Acl> {
        let o = self.object(v, "each entry of \"acls\"")?;
        let mut action = None;
        let (mut src, mut dst, mut proto) = (None, None, None);
        for (key, prop) in self.props(o)? {
            match key.as_str() {
                "action" => action = Some(&prop.value),
                "src" | "users" if src.is_none() => src = Some(&prop.value),
                "dst" | "ports" if dst.is_none() => dst = Some(&prop.value),
                "proto" => proto = Some(&prop.value),
                "src" | "users" | "dst" | "ports" => {
                    return self.err(
                        prop.name.start(),
                        "use either \"src\" or legacy \"users\" (and \"dst\" or legacy \"ports\"), not both",
                    );
                }
                "srcposture" => {
                    return self.err(
                        prop.name.start(),
                        "\"srcPosture\" is not supported by tsunagu",
                    );
                }
                _ => {
                    return self.err(
                        prop.name.start(),
                        format!(
                            "unknown key \"{}\" in ACL rule (expected action, src, dst, proto)",
                            prop.name.as_str()
                        ),
                    );
                }
            }
        }
        match action {
            None => return self.err(o.start(), "ACL rule is missing \"action\""),
            Some(a) => {
                let s = self.string(a, "\"action\"")?;
                if s != "accept" {
                    return self.err(
                        a.start(),
                        format!("unsupported action \"{s}\" (only \"accept\" exists)"),
                    );
                }
            }
        }
        let Some(src) = src else {
            return self.err(o.start(), "ACL rule is missing \"src\"");
        };
        let Some(dst) = dst else {
            return self.err(o.start(), "ACL rule is missing \"dst\"");
        };
        let proto = match proto {
            None => Vec::new(),
            Some(p) => self.proto(p)?,
        };
        let port_capable = proto.is_empty() || proto.iter().all(|p| matches!(p, 6 | 17 | 132));

        let mut src_aliases = Vec::new();
        for (s, off) in self.strings(src, "\"src\"")? {
            src_aliases.push(self.alias(s, off, Ctx::Src)?);
        }
        let mut dsts = Vec::new();
        for (s, off) in self.strings(dst, "\"dst\"")? {
            let Some((target, ports)) = split_dst(s) else {
                return self.err(
                    off,
                    format!("destination \"{s}\" must have the form <target>:<ports> (e.g. \"tag:web:80,443\" or \"*:*\")"),
                );
            };
            let alias = self.alias(target, off, Ctx::Dst)?;
            let ports = match parse_ports(ports) {
                Ok(p) => p,
                Err(why) => return self.err(off, format!("bad port range in \"{s}\": {why}")),
            };
            if !port_capable && ports != [PortRange::ALL] {
                return self.err(
                    off,
                    format!("\"{s}\": ports can only be restricted for tcp, udp or sctp; use \":*\" with this proto"),
                );
            }
            dsts.push(Dst { alias, ports });
        }
        let uses_self = dsts.iter().any(|d| d.alias == Alias::SelfDevices);
        if uses_self {
            for (s, off) in self.strings(src, "\"src\"")? {
                let a = self.alias(s, off, Ctx::Src)?;
                if !matches!(a, Alias::User(_) | Alias::Group(_) | Alias::Member) {
                    return self.err(
                        off,
                        format!("\"{s}\": a rule with autogroup:self in dst may only have users, groups or autogroup:member in src"),
                    );
                }
            }
        }
        Ok(Acl {
            src: src_aliases,
            dst: dsts,
            proto,
        })
    }

    fn proto(&self, v: &Value<'_>) -> R<Vec<u8>> {
        let (s, off) = match v {
            Value::StringLit(s) => (s.value.as_ref(), v.start()),
            Value::NumberLit(n) => (n.value, v.start()),
            _ => return self.err(v.start(), "\"proto\" must be a string"),
        };
        match parse_proto(s) {
            Some(p) => Ok(p),
            None => self.err(
                off,
                format!(
                    "unknown protocol \"{s}\" (use a name like \"tcp\" or an IANA number 1-255)"
                ),
            ),
        }
    }

    fn auto_approvers(&self, v: &Value<'_>) -> R<AutoApprovers> {
        let o = self.object(v, "\"autoApprovers\"")?;
        let mut out = AutoApprovers::default();
        for (key, prop) in self.props(o)? {
            match key.as_str() {
                "exitnode" => {
                    for (s, off) in self.strings(&prop.value, "\"exitNode\"")? {
                        out.exit_node.push(self.alias(s, off, Ctx::Approver)?);
                    }
                }
                "routes" => {
                    for route in self.data_props(&prop.value, "\"routes\"")? {
                        let net = match parse_prefix(route.name.as_str()) {
                            Ok(n) => n,
                            Err(why) => return self.err(route.name.start(), why),
                        };
                        let mut approvers = Vec::new();
                        for (s, off) in self.strings(&route.value, "a route's approvers")? {
                            approvers.push(self.alias(s, off, Ctx::Approver)?);
                        }
                        out.routes.push((net, approvers));
                    }
                }
                "services" => {
                    return self.err(
                        prop.name.start(),
                        "\"services\" auto approvers are not supported by tsunagu",
                    );
                }
                _ => {
                    return self.err(
                        prop.name.start(),
                        format!(
                            "unknown key \"{}\" in autoApprovers (expected exitNode, routes)",
                            prop.name.as_str()
                        ),
                    );
                }
            }
        }
        Ok(out)
    }

    fn alias(&self, s: &str, off: usize, ctx: Ctx) -> R<Alias> {
        let approver_only = |kind: &str| {
            self.err(
                off,
                format!("\"{s}\": {kind} cannot be an auto approver (use users, groups, tags, autogroup:member or autogroup:tagged)"),
            )
        };
        if s == "*" {
            return if ctx == Ctx::Approver {
                approver_only("\"*\"")
            } else {
                Ok(Alias::Any)
            };
        }
        if s.starts_with("group:") {
            if !self.groups.contains_key(s) {
                return self.err(
                    off,
                    format!("unknown group \"{s}\" (not defined in \"groups\")"),
                );
            }
            return Ok(Alias::Group(s.to_string()));
        }
        if s.starts_with("tag:") {
            if !self.tags.contains(s) {
                return self.err(off, format!("tag \"{s}\" has no tagOwners entry"));
            }
            return Ok(Alias::Tag(s.to_string()));
        }
        if let Some(ag) = s.strip_prefix("autogroup:") {
            let a = match ag {
                "member" => Alias::Member,
                "tagged" => Alias::Tagged,
                "internet" | "self" if ctx != Ctx::Dst => {
                    return if ctx == Ctx::Approver {
                        approver_only(s)
                    } else {
                        self.err(off, format!("\"{s}\" can only be used as a destination"))
                    };
                }
                "internet" => Alias::Internet,
                "self" => Alias::SelfDevices,
                _ => {
                    return self.err(
                        off,
                        format!("unknown or unsupported autogroup \"{s}\" (supported: autogroup:member, autogroup:tagged, autogroup:internet, autogroup:self)"),
                    );
                }
            };
            return Ok(a);
        }
        if looks_like_ip(s) {
            if ctx == Ctx::Approver {
                return approver_only("an IP address or CIDR");
            }
            return match parse_prefix(s) {
                Ok(net) => Ok(Alias::Prefix(net)),
                Err(why) => self.err(off, why),
            };
        }
        if let Some(net) = self.hosts.get(s) {
            if ctx == Ctx::Approver {
                return approver_only("a host alias");
            }
            return Ok(Alias::Prefix(*net));
        }
        if s.contains(':') {
            return self.err(off, format!("unknown selector \"{s}\""));
        }
        match check_user(s) {
            Ok(u) => Ok(Alias::User(u.to_string())),
            Err(why) => self.err(
                off,
                format!("\"{s}\" is not a valid user, host or selector: {why}"),
            ),
        }
    }
}

/// `alias:ports`, split at the last colon (so IPv6 addresses work, as in
/// Tailscale), or `[v6]:ports`.
fn split_dst(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        return Some((inside, after.strip_prefix(':')?));
    }
    s.rsplit_once(':')
}

fn looks_like_ip(s: &str) -> bool {
    s.contains('/')
        || s.contains(':')
            && s.chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        || (s.contains('.') && s.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// An IP (`1.2.3.4`, as a /32 or /128) or a CIDR whose host bits are zero.
pub(crate) fn parse_prefix(s: &str) -> Result<IpNet, String> {
    if s.contains('/') {
        let net: IpNet = s.parse().map_err(|_| format!("invalid CIDR \"{s}\""))?;
        if net.trunc() != net {
            return Err(format!(
                "CIDR \"{s}\" has host bits set (did you mean \"{}\"?)",
                net.trunc()
            ));
        }
        Ok(net)
    } else {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| format!("invalid IP address \"{s}\""))?;
        Ok(IpNet::from(ip))
    }
}

/// `*`, `22`, `80,443`, `1000-2000`, and comma-separated mixes.
pub(crate) fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    if s == "*" {
        return Ok(vec![PortRange::ALL]);
    }
    let num = |p: &str| -> Result<u16, String> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("\"{p}\" is not a port number"));
        }
        p.parse::<u16>()
            .map_err(|_| format!("port {p} is out of range (0-65535)"))
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let range = match part.split_once('-') {
            Some((a, b)) => {
                let (first, last) = (num(a)?, num(b)?);
                if first > last {
                    return Err(format!("range {part} is backwards"));
                }
                PortRange { first, last }
            }
            None if part == "*" => return Err("\"*\" cannot be combined with other ports".into()),
            None => {
                let p = num(part)?;
                PortRange { first: p, last: p }
            }
        };
        out.push(range);
    }
    Ok(out)
}

fn parse_proto(s: &str) -> Option<Vec<u8>> {
    let n = match s.to_ascii_lowercase().as_str() {
        "icmp" => 1,
        "igmp" => 2,
        "ipv4" | "ip-in-ip" => 4,
        "tcp" => 6,
        "egp" => 8,
        "igp" => 9,
        "udp" => 17,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "ipv6-icmp" | "icmpv6" => 58,
        "sctp" => 132,
        num if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) => {
            match num.parse::<u8>() {
                Ok(n) if n > 0 => n,
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(vec![n])
}

fn check_name_chars(rest: &str) -> Result<(), String> {
    if rest.is_empty() {
        return Err("the name is empty".into());
    }
    if let Some(c) = rest
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "character {c:?} is not allowed (use letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

fn check_prefixed_name(name: &str, prefix: &str) -> Result<(), String> {
    match name.strip_prefix(prefix) {
        None => Err(format!("must start with \"{prefix}\"")),
        Some(rest) => check_name_chars(rest),
    }
}

fn check_host_name(name: &str) -> Result<(), String> {
    if name.contains(':') || name.contains('@') || name == "*" {
        return Err("host names cannot contain ':' or '@' or be \"*\"".into());
    }
    if looks_like_ip(name) {
        return Err("host names cannot look like IP addresses".into());
    }
    check_name_chars(name)
}

/// Validate a user token and return its canonical form.
fn check_user(s: &str) -> Result<&str, String> {
    let u = canonical_user(s);
    if u.is_empty() {
        return Err("empty user name".into());
    }
    if let Some(c) = u.chars().find(|c| {
        c.is_whitespace() || c.is_control() || matches!(c, ':' | ',' | '*' | '/' | '[' | ']')
    }) {
        return Err(format!("character {c:?} is not allowed in a user name"));
    }
    if u.matches('@').count() > 1 || u.starts_with('@') {
        return Err("a user name has at most one '@', not at the start".into());
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_ports("*").unwrap(), vec![PortRange::ALL]);
        assert_eq!(
            parse_ports("22,80-90").unwrap(),
            vec![
                PortRange {
                    first: 22,
                    last: 22
                },
                PortRange {
                    first: 80,
                    last: 90
                }
            ]
        );
        for bad in ["", "a", "70000", "9-1", "1,,2", "+5", "1-", "*,22", "-"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dst_split() {
        assert_eq!(split_dst("tag:exit:*"), Some(("tag:exit", "*")));
        assert_eq!(split_dst("fd7a::1:22"), Some(("fd7a::1", "22")));
        assert_eq!(split_dst("[fd7a::1]:22"), Some(("fd7a::1", "22")));
        assert_eq!(split_dst("[fd7a::1]22"), None);
        assert_eq!(split_dst("nas"), None);
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            parse_prefix("198.18.5.1").unwrap().to_string(),
            "198.18.5.1/32"
        );
        assert!(parse_prefix("198.18.5.1/24").is_err());
        assert!(parse_prefix("198.18.5.0/33").is_err());
        assert!(parse_prefix("300.0.0.1").is_err());
        assert_eq!(parse_prefix("fd7a::/48").unwrap().to_string(), "fd7a::/48");
    }

    #[test]
    fn protos() {
        assert_eq!(parse_proto("TCP"), Some(vec![6]));
        assert_eq!(parse_proto("47"), Some(vec![47]));
        assert_eq!(parse_proto("0"), None);
        assert_eq!(parse_proto("256"), None);
        assert_eq!(parse_proto("bogus"), None);
    }
}
