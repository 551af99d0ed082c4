//! DNS messages: the queries we accept and the answers we build.

use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};
use std::net::IpAddr;

/// Largest query accepted (UDP, TCP or DoH). Real queries are well under 512 bytes;
/// 4096 leaves room for EDNS options.
pub const MAX_QUERY: usize = 4096;
/// Largest answer relayed: a TCP DNS message's own limit.
pub const MAX_RESPONSE: usize = 65535;
/// TTL of the answers we make up (MagicDNS names follow the map, which changes fast).
pub const LOCAL_TTL: u32 = 60;

/// Why bytes are not a query we handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    #[error("empty message")]
    Empty,
    #[error("message of {0} bytes is larger than {MAX_QUERY}")]
    TooLarge(usize),
    #[error("not a DNS message: {0}")]
    Malformed(String),
    #[error("a response, not a query")]
    NotAQuery,
    #[error("opcode {0} is not a standard query")]
    NotStandardQuery(u8),
    #[error("{0} questions (one is supported)")]
    QuestionCount(usize),
    #[error("a query carrying answer or authority records")]
    HasRecords,
}

/// A query we handle: one question, a standard query.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: u16,
    /// The question's name, lower-cased, fully qualified.
    pub name: Name,
    pub qtype: RecordType,
    /// The whole message, for forwarding and for answers that echo it.
    pub message: Message,
    /// The bytes as received (forwarded unchanged).
    pub bytes: Vec<u8>,
}

/// Check and parse a query.
pub fn parse_query(bytes: &[u8]) -> Result<Query, MessageError> {
    if bytes.is_empty() {
        return Err(MessageError::Empty);
    }
    if bytes.len() > MAX_QUERY {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    let message = Message::from_vec(bytes).map_err(|e| MessageError::Malformed(e.to_string()))?;
    if message.metadata.message_type != MessageType::Query {
        return Err(MessageError::NotAQuery);
    }
    if message.metadata.op_code != OpCode::Query {
        return Err(MessageError::NotStandardQuery(u8::from(
            message.metadata.op_code,
        )));
    }
    if message.queries.len() != 1 {
        return Err(MessageError::QuestionCount(message.queries.len()));
    }
    if !message.answers.is_empty() || !message.authorities.is_empty() {
        return Err(MessageError::HasRecords);
    }
    let q = &message.queries[0];
    let mut name = q.name().to_lowercase();
    name.set_fqdn(true);
    Ok(Query {
        id: message.metadata.id,
        name,
        qtype: q.query_type(),
        bytes: bytes.to_vec(),
        message,
    })
}

/// A response to `q` with `rcode` and these answers (authoritative when we own them).
fn respond(q: &Query, rcode: ResponseCode, answers: Vec<Record>, authoritative: bool) -> Vec<u8> {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = q.message.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = authoritative;
    m.metadata.response_code = rcode;
    let mut question = HQuery::query(q.message.queries[0].name().clone(), q.qtype);
    question.set_query_class(q.message.queries[0].query_class());
    m.add_query(question);
    m.add_answers(answers);
    // Only fails on names or records we did not build from valid parts; a header-only
    // SERVFAIL is the safe fallback.
    m.to_vec()
        .unwrap_or_else(|_| header_only(q.id, ResponseCode::ServFail))
}

/// A 12-byte response header with no sections.
fn header_only(id: u16, rcode: ResponseCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&id.to_be_bytes());
    out.push(0x80); // QR
    out.push(0x80 | (rcode.low() & 0x0f)); // RA, rcode
    out.extend_from_slice(&[0; 8]);
    out
}

/// SERVFAIL for `q` (an upstream that failed or timed out, DNS failing closed).
pub fn servfail(q: &Query) -> Vec<u8> {
    respond(q, ResponseCode::ServFail, Vec::new(), false)
}

/// REFUSED for `q`.
pub fn refused(q: &Query) -> Vec<u8> {
    respond(q, ResponseCode::Refused, Vec::new(), false)
}

/// NXDOMAIN for a name we own.
pub fn nxdomain(q: &Query) -> Vec<u8> {
    respond(q, ResponseCode::NXDomain, Vec::new(), true)
}

/// Answers for `q` from addresses (only those of the asked family: A or AAAA); an
/// empty answer (NODATA) for other types.
pub fn address_answer(q: &Query, addrs: &[IpAddr]) -> Vec<u8> {
    let answers = addrs
        .iter()
        .filter_map(|ip| match (q.qtype, ip) {
            (RecordType::A, IpAddr::V4(v4)) => Some(RData::A(rdata::A(*v4))),
            (RecordType::AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(rdata::AAAA(*v6))),
            _ => None,
        })
        .map(|rd| Record::from_rdata(q.name.clone(), LOCAL_TTL, rd))
        .collect();
    respond(q, ResponseCode::NoError, answers, true)
}

/// A PTR answer for `q`.
pub fn ptr_answer(q: &Query, target: &Name) -> Vec<u8> {
    let answers = if q.qtype == RecordType::PTR {
        vec![Record::from_rdata(
            q.name.clone(),
            LOCAL_TTL,
            RData::PTR(rdata::PTR(target.clone())),
        )]
    } else {
        Vec::new()
    };
    respond(q, ResponseCode::NoError, answers, true)
}

/// Why an upstream's bytes are not an answer to our query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("answer of {0} bytes is larger than {MAX_RESPONSE}")]
    TooLarge(usize),
    #[error("not a DNS message: {0}")]
    Malformed(String),
    #[error("not a response")]
    NotAResponse,
    #[error("answers another query (id or question differ)")]
    Mismatch,
}

/// Check that `bytes` answer `q` (same ID, a response, the same question), so that a
/// stray or spoofed datagram is not handed to the application.
pub fn check_answer(q: &Query, bytes: &[u8]) -> Result<(), AnswerError> {
    if bytes.len() > MAX_RESPONSE {
        return Err(AnswerError::TooLarge(bytes.len()));
    }
    let m = Message::from_vec(bytes).map_err(|e| AnswerError::Malformed(e.to_string()))?;
    if m.metadata.message_type != MessageType::Response {
        return Err(AnswerError::NotAResponse);
    }
    let same_question = match m.queries.first() {
        Some(a) => a.name().to_lowercase() == q.name.to_lowercase() && a.query_type() == q.qtype,
        // A header-only error answer (some servers send FORMERR so).
        None => m.metadata.response_code != ResponseCode::NoError,
    };
    if m.metadata.id != q.id || !same_question {
        return Err(AnswerError::Mismatch);
    }
    Ok(())
}

/// Whether the answer was truncated (TC): ask again over TCP.
pub fn is_truncated(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && bytes[2] & 0x02 != 0
}

/// A query for `name` and `qtype` with ID `id` and recursion desired (tests, tools,
/// the benchmark).
pub fn build_query(id: u16, name: &str, qtype: RecordType) -> Option<Vec<u8>> {
    let mut fq = Name::from_ascii(name).ok()?;
    fq.set_fqdn(true);
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(HQuery::query(fq, qtype));
    m.to_vec().ok()
}

/// The rcode and the addresses (A/AAAA) of an answer (tests, tools).
pub fn answer_addrs(bytes: &[u8]) -> Option<(ResponseCode, Vec<IpAddr>)> {
    let m = Message::from_vec(bytes).ok()?;
    let addrs = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    Some((m.metadata.response_code, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_checked() {
        let q = build_query(7, "Web.Lab.Test", RecordType::A).unwrap();
        let p = parse_query(&q).unwrap();
        assert_eq!(p.id, 7);
        assert_eq!(p.name.to_ascii(), "web.lab.test.");
        assert_eq!(parse_query(&[]).unwrap_err(), MessageError::Empty);
        assert!(matches!(
            parse_query(b"GET / HTTP/1.1\r\n"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            parse_query(&vec![0; MAX_QUERY + 1]),
            Err(MessageError::TooLarge(_))
        ));
        // A response is not a query.
        let a = address_answer(&p, &["203.0.113.10".parse().unwrap()]);
        assert_eq!(parse_query(&a).unwrap_err(), MessageError::NotAQuery);
        // No question.
        let mut m = Message::query();
        m.metadata.id = 1;
        assert_eq!(
            parse_query(&m.to_vec().unwrap()).unwrap_err(),
            MessageError::QuestionCount(0)
        );
    }

    #[test]
    fn answers_match_their_query() {
        let p = parse_query(&build_query(9, "web.lab.test", RecordType::A).unwrap()).unwrap();
        let a = address_answer(
            &p,
            &[
                "203.0.113.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
        );
        check_answer(&p, &a).unwrap();
        let (rc, addrs) = answer_addrs(&a).unwrap();
        assert_eq!(rc, ResponseCode::NoError);
        assert_eq!(addrs, ["203.0.113.10".parse::<IpAddr>().unwrap()], "A only");
        let other = parse_query(&build_query(10, "web.lab.test", RecordType::A).unwrap()).unwrap();
        assert_eq!(check_answer(&other, &a), Err(AnswerError::Mismatch));
        let sf = servfail(&p);
        check_answer(&p, &sf).unwrap();
        assert_eq!(answer_addrs(&sf).unwrap().0, ResponseCode::ServFail);
        assert!(!is_truncated(&sf));
        assert_eq!(header_only(3, ResponseCode::ServFail)[3] & 0x0f, 2);
    }
}
