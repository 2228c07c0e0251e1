//! The cluster zone as it is answered: [`Records`] compiled into an immutable,
//! query-ready [`Zone`] (every name of the zone with its A records, and the
//! SOA), and the answer to a query for a name inside the zone.

use std::collections::HashMap;
use std::iter;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context};
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use super::{Records, TTL};
/// The zone's origin (fully qualified) from its configured name.
pub(super) fn zone_name(zone: &str) -> anyhow::Result<Name> {
    let zone = zone.trim().trim_end_matches('.');
    if zone.is_empty() {
        bail!("DNS: empty zone name");
    }
    let mut name = Name::from_ascii(zone).with_context(|| format!("DNS: bad zone name {zone:?}"))?;
    name.set_fqdn(true);
    Ok(name)
}

/// The zone, query-ready: an immutable form of [`Records`].
pub(super) struct Zone {
    names: HashMap<LowerName, NameRecords>,
    soa: Record,
}

/// A name of the zone; empty for names that only exist because names below them
/// do (the apex, `node.<zone>`, a service with no healthy replica).
#[derive(Default)]
struct NameRecords {
    local: Vec<Record>,
    remote: Vec<Record>,
    next: AtomicUsize,
}

impl Zone {
    /// The zone `origin` serving `records`, with SOA serial `serial`.
    pub(super) fn build(origin: &Name, records: &Records, serial: u32) -> Zone {
        let mut names: HashMap<LowerName, NameRecords> = HashMap::new();
        let mut add = |labels: &[&str], local: Vec<Ipv4Addr>, remote: Vec<Ipv4Addr>| {
            let Some(name) = child(origin, labels) else {
                tracing::warn!(name = ?labels, "DNS: skipping a name that is not valid");
                return;
            };
            let rec = |ip: Ipv4Addr| Record::from_rdata(name.clone(), TTL, RData::A(A(ip)));
            // Ancestors up to the apex exist (empty) so that they answer NOERROR.
            let mut parent = name.base_name();
            while parent.num_labels() >= origin.num_labels() {
                names.entry(LowerName::new(&parent)).or_default();
                if parent.num_labels() == origin.num_labels() {
                    break;
                }
                parent = parent.base_name();
            }
            names.insert(
                LowerName::new(&name),
                NameRecords {
                    local: local.into_iter().map(rec).collect(),
                    remote: remote.into_iter().map(rec).collect(),
                    next: AtomicUsize::new(0),
                },
            );
        };
        for (service, addrs) in &records.services {
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for a in addrs.iter().filter(|a| a.healthy) {
                if local.contains(&a.ip) || remote.contains(&a.ip) {
                    continue;
                }
                if a.local {
                    local.push(a.ip);
                } else {
                    remote.push(a.ip);
                }
            }
            add(&[service], local, remote);
        }
        for ((replica, service), ip) in &records.replicas {
            add(&[replica, service], vec![*ip], Vec::new());
        }
        // Nodes last: `x.node.<zone>` is a node even if a service is named "node".
        for (node, ip) in &records.nodes {
            add(&[node, "node"], vec![*ip], Vec::new());
        }
        names.entry(LowerName::new(origin)).or_default();

        let mname = child(origin, &["ns"]).unwrap_or_else(|| origin.clone());
        let rname = child(origin, &["hostmaster"]).unwrap_or_else(|| origin.clone());
        let soa = SOA::new(mname, rname, serial, 60, 10, 3600, TTL);
        let soa = Record::from_rdata(origin.clone(), TTL, RData::SOA(soa));
        Zone { names, soa }
    }
}

/// `labels` (leftmost first) prepended to `origin`; None if a label is not a valid DNS label.
fn child(origin: &Name, labels: &[&str]) -> Option<Name> {
    let mut name = origin.clone();
    for label in labels.iter().rev() {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return None;
        }
        name = name.prepend_label(label.to_ascii_lowercase()).ok()?;
    }
    Some(name)
}

/// Answers `request`, a query for a name of `zone` (whose origin is `origin`),
/// authoritatively.
pub(super) async fn answer<R: ResponseHandler>(
    zone: &Zone,
    origin: &LowerName,
    request: &Request,
    mut response_handle: R,
) -> ResponseInfo {
    let mut meta = Metadata::response_from_request(&request.metadata);
    meta.authoritative = true;
    meta.recursion_available = true;

    let edns = request.edns.as_ref().map(|req| {
        let mut edns = Edns::new();
        edns.set_max_payload(req.max_payload().max(512));
        edns.set_version(0);
        edns
    });
    let bad_version = request.edns.as_ref().is_some_and(|e| e.version() > 0);

    let empty: &[Record] = &[];
    let (mut local, mut remote, mut soa) = (empty, empty, None);
    let (mut lk, mut rk) = (0, 0);
    let query = request.request_info().map(|i| i.query);
    match query {
        _ if bad_version => meta.response_code = ResponseCode::BADVERS,
        _ if request.metadata.op_code != OpCode::Query => meta.response_code = ResponseCode::NotImp,
        Err(_) => meta.response_code = ResponseCode::FormErr,
        Ok(q) if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) => meta.response_code = ResponseCode::Refused,
        Ok(q) if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) => {
            meta.response_code = ResponseCode::Refused
        }
        Ok(q) => match zone.names.get(q.name()) {
            None => {
                meta.response_code = ResponseCode::NXDomain;
                soa = Some(&zone.soa);
            }
            Some(node) => match q.query_type() {
                RecordType::A | RecordType::ANY if !(node.local.is_empty() && node.remote.is_empty()) => {
                    let n = node.next.fetch_add(1, Ordering::Relaxed);
                    (local, remote) = (&node.local[..], &node.remote[..]);
                    lk = if local.is_empty() { 0 } else { n % local.len() };
                    rk = if remote.is_empty() { 0 } else { n % remote.len() };
                }
                RecordType::SOA if q.name() == origin => {
                    local = std::slice::from_ref(&zone.soa);
                }
                _ => soa = Some(&zone.soa),
            },
        },
    }

    let answers = local[lk..]
        .iter()
        .chain(&local[..lk])
        .chain(&remote[rk..])
        .chain(&remote[..rk]);
    let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
        meta,
        answers,
        iter::empty(),
        soa,
        iter::empty(),
    );
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "DNS: sending a response");
            meta.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: meta,
                counts: HeaderCounts::default(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::ServiceAddr;

    #[test]
    fn zone_names() {
        let origin = zone_name("Internal.").unwrap();
        let mut records = Records::default();
        records.services.insert(
            "Web".into(),
            vec![
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 0, 0, 2),
                    local: false,
                    healthy: true,
                },
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 0, 1, 2),
                    local: true,
                    healthy: true,
                },
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 0, 1, 3),
                    local: true,
                    healthy: false,
                },
            ],
        );
        records
            .replicas
            .insert(("web-1".into(), "web".into()), Ipv4Addr::new(10, 0, 1, 2));
        records.nodes.insert("n1".into(), Ipv4Addr::new(100, 64, 0, 1));
        records.services.insert("bad name".into(), vec![]);
        let zone = Zone::build(&origin, &records, 7);
        let get = |n: &str| zone.names.get(&LowerName::new(&Name::from_ascii(n).unwrap()));
        let web = get("web.internal.").unwrap();
        let ips = |rs: &[Record]| rs.iter().map(|r| r.data.clone()).collect::<Vec<_>>();
        assert_eq!(ips(&web.local), vec![RData::A(A(Ipv4Addr::new(10, 0, 1, 2)))]);
        assert_eq!(ips(&web.remote), vec![RData::A(A(Ipv4Addr::new(10, 0, 0, 2)))]);
        assert_eq!(get("WEB-1.web.internal.").unwrap().local.len(), 1);
        assert_eq!(get("n1.node.internal.").unwrap().local.len(), 1);
        // Empty non-terminals and the apex exist, without records.
        assert!(get("node.internal.").unwrap().local.is_empty());
        assert!(get("internal.").is_some());
        assert!(get("nope.internal.").is_none());
        assert_eq!(zone.names.len(), 5);
    }
}
