//! Cluster DNS for the node tier's real nodes (what CoreDNS's `kubernetes` plugin is on a real
//! cluster, for the records the project's pods look up): A records under the cluster domain, from
//! a watch of Services and EndpointSlices.
//!
//! - `<service>.<namespace>.svc.<domain>`: the Service's cluster IP, or for a headless Service the
//!   addresses of its endpoints (ready ones, and not-ready ones when the Service publishes them).
//! - `<hostname>.<service>.<namespace>.svc.<domain>`: the endpoint of a headless Service whose pod
//!   set that `hostname` under that `subdomain` (a gang's workers, `a1-w0.<job>-workers...`).
//!
//! Any other name is NXDOMAIN, so that a resolver walking its search list moves on; a known name
//! asked for another type (AAAA) is an empty NOERROR. UDP only (answers here are small).
//!
//!   anneal-cluster-dns --listen ADDR:PORT --kubeconfig PATH [--domain cluster.local] [--state DIR]
//!
//! `--state` only marks the process as the nodes' (e2e/cluster/nodes-lib.sh finds it by a command
//! line naming the nodes' directory).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, ResourceExt};
use tokio::net::UdpSocket;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_FORMERR: u8 = 1;
/// Seconds a resolver may keep an answer: short, as pod addresses change with every attempt.
const TTL: u32 = 5;

struct Args {
    listen: SocketAddr,
    kubeconfig: String,
    domain: String,
}

fn args() -> Result<Args> {
    let mut listen = None;
    let mut kubeconfig = None;
    let mut domain = "cluster.local".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?.parse().context("--listen ADDR:PORT")?),
            "--kubeconfig" => kubeconfig = Some(value()?),
            "--domain" => domain = value()?.trim_matches('.').to_ascii_lowercase(),
            "--state" => {
                value()?;
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        listen: listen.context("--listen is required")?,
        kubeconfig: kubeconfig.context("--kubeconfig is required")?,
        domain,
    })
}

/// What the watches know: Services and EndpointSlices.
struct Records {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    domain: String,
}

impl Records {
    /// The addresses of `name` (lower case, no trailing dot), or `None` when it does not exist.
    fn lookup(&self, name: &str) -> Option<Vec<Ipv4Addr>> {
        let rest = name.strip_suffix(&format!(".svc.{}", self.domain))?;
        let labels: Vec<&str> = rest.split('.').collect();
        let (host, service, namespace) = match labels.as_slice() {
            [service, namespace] => (None, *service, *namespace),
            [host, service, namespace] => (Some(*host), *service, *namespace),
            _ => return None,
        };
        let svc = self
            .services
            .state()
            .into_iter()
            .find(|s| s.name_any() == service && s.namespace().as_deref() == Some(namespace))?;
        let spec = svc.spec.as_ref()?;
        let headless = spec.cluster_ip.as_deref().is_none_or(|ip| ip == "None");
        if host.is_none() && !headless {
            return Some(
                spec.cluster_ip
                    .as_deref()
                    .and_then(|ip| ip.parse().ok())
                    .into_iter()
                    .collect(),
            );
        }
        let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
        let mut found = BTreeMap::new();
        for slice in self.slices.state() {
            let of_service = slice
                .labels()
                .get("kubernetes.io/service-name")
                .map(String::as_str)
                == Some(service)
                && slice.namespace().as_deref() == Some(namespace);
            if !of_service {
                continue;
            }
            for endpoint in &slice.endpoints {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if !(ready || publish_not_ready) {
                    continue;
                }
                if host.is_some() && endpoint.hostname.as_deref() != host {
                    continue;
                }
                for address in &endpoint.addresses {
                    if let Ok(ip) = address.parse::<Ipv4Addr>() {
                        found.insert(ip, ());
                    }
                }
            }
        }
        // A host name no endpoint carries does not exist; a headless Service without endpoints
        // exists, with no address yet.
        if host.is_some() && found.is_empty() {
            return None;
        }
        Some(found.into_keys().collect())
    }
}

/// The question of a query: its name (lower case, dotted), type and class, and where it ends.
fn question(packet: &[u8]) -> Option<(String, u16, u16, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*packet.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers do not appear in a question of a query.
        if len > 63 {
            return None;
        }
        let label = packet.get(at..at + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes(packet.get(at..at + 2)?.try_into().ok()?);
    let qclass = u16::from_be_bytes(packet.get(at + 2..at + 4)?.try_into().ok()?);
    Some((labels.join("."), qtype, qclass, at + 4))
}

/// The answer to one query packet (`None`: not a query, dropped).
fn answer(records: &Records, query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let questions = u16::from_be_bytes([query[4], query[5]]);
    let mut reply = query[..12].to_vec();
    // QR, the query's opcode and RD kept, AA set; RA clear (no recursion here).
    reply[2] = 0x80 | (query[2] & 0x79) | 0x04;
    reply[3] = 0;
    reply[6..12].fill(0);
    let parsed = (questions == 1).then(|| question(query)).flatten();
    let Some((name, qtype, qclass, end)) = parsed else {
        reply[3] = RCODE_FORMERR;
        return Some(reply);
    };
    reply[5] = 1;
    reply[4] = 0;
    reply.extend_from_slice(&query[12..end]);
    match records.lookup(&name) {
        None => reply[3] = RCODE_NXDOMAIN,
        Some(addresses) if qtype == TYPE_A && qclass == CLASS_IN => {
            let count = u16::try_from(addresses.len()).unwrap_or(u16::MAX);
            reply[6..8].copy_from_slice(&count.to_be_bytes());
            for ip in addresses.iter().take(usize::from(count)) {
                // The name as a pointer to the question's (offset 12).
                reply.extend_from_slice(&[0xc0, 12]);
                reply.extend_from_slice(&TYPE_A.to_be_bytes());
                reply.extend_from_slice(&CLASS_IN.to_be_bytes());
                reply.extend_from_slice(&TTL.to_be_bytes());
                reply.extend_from_slice(&4u16.to_be_bytes());
                reply.extend_from_slice(&ip.octets());
            }
        }
        // The name exists, with no record of that type.
        Some(_) => {}
    }
    Some(reply)
}

async fn store<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(|event| async move {
            if let Err(err) = event {
                eprintln!("anneal-cluster-dns: watch: {err}");
            }
        });
    tokio::spawn(stream);
    reader
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let records = Arc::new(Records {
        services: store(Api::<Service>::all(client.clone())).await,
        slices: store(Api::<EndpointSlice>::all(client)).await,
        domain: args.domain,
    });
    records.services.wait_until_ready().await?;
    records.slices.wait_until_ready().await?;
    let socket = UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "anneal-cluster-dns: serving *.svc.{} on {}",
        records.domain, args.listen
    );
    let mut buf = [0u8; 512];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(err) => {
                eprintln!("anneal-cluster-dns: receive: {err}");
                continue;
            }
        };
        if let Some(reply) = answer(&records, &buf[..len])
            && let Err(err) = socket.send_to(&reply, from).await
        {
            eprintln!("anneal-cluster-dns: reply to {from}: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    #[test]
    fn the_question_is_read_back_in_lower_case() {
        let q = query("A1-W0.Dp-Workers.ns.svc.cluster.local", TYPE_A);
        let (name, qtype, qclass, end) = question(&q).unwrap();
        assert_eq!(name, "a1-w0.dp-workers.ns.svc.cluster.local");
        assert_eq!((qtype, qclass, end), (TYPE_A, CLASS_IN, q.len()));
        assert!(question(&q[..q.len() - 3]).is_none(), "truncated");
    }

    fn records(objects: serde_json::Value) -> Records {
        let (services, mut service_writer) = reflector::store::<Service>();
        let (slices, mut slice_writer) = reflector::store::<EndpointSlice>();
        for object in objects.as_array().unwrap() {
            if object["kind"] == "Service" {
                let svc: Service = serde_json::from_value(object.clone()).unwrap();
                service_writer.apply_watcher_event(&watcher::Event::Apply(svc));
            } else {
                let slice: EndpointSlice = serde_json::from_value(object.clone()).unwrap();
                slice_writer.apply_watcher_event(&watcher::Event::Apply(slice));
            }
        }
        Records {
            services,
            slices,
            domain: "cluster.local".into(),
        }
    }

    fn rcode_and_addresses(reply: &[u8], question_end: usize) -> (u8, Vec<Ipv4Addr>) {
        let count = u16::from_be_bytes([reply[6], reply[7]]);
        let mut at = question_end;
        let mut out = Vec::new();
        for _ in 0..count {
            // Name pointer, type, class, TTL and length (12 bytes), then the address.
            at += 12;
            out.push(Ipv4Addr::new(
                reply[at],
                reply[at + 1],
                reply[at + 2],
                reply[at + 3],
            ));
            at += 4;
        }
        (reply[3] & 0x0f, out)
    }

    #[test]
    fn names_of_services_and_gang_workers_resolve_others_do_not() {
        let r = records(serde_json::json!([
            {"kind": "Service", "metadata": {"name": "web", "namespace": "ns"},
             "spec": {"clusterIP": "10.96.0.7"}},
            {"kind": "Service", "metadata": {"name": "dp-workers", "namespace": "ns"},
             "spec": {"clusterIP": "None", "publishNotReadyAddresses": true}},
            {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
             "metadata": {"name": "dp-workers-x", "namespace": "ns",
                          "labels": {"kubernetes.io/service-name": "dp-workers"}},
             "addressType": "IPv4",
             "endpoints": [
                {"addresses": ["10.244.0.5"], "hostname": "a1-w0", "conditions": {"ready": false}},
                {"addresses": ["10.244.1.9"], "hostname": "a1-w1", "conditions": {"ready": true}}]},
        ]));
        let ask = |name: &str, qtype: u16| {
            let q = query(name, qtype);
            let reply = answer(&r, &q).unwrap();
            assert_eq!(&reply[..2], &q[..2], "the id is echoed");
            assert_eq!(reply[2] & 0x80, 0x80, "a response");
            rcode_and_addresses(&reply, q.len())
        };
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            ask("web.ns.svc.cluster.local", TYPE_A),
            (0, vec![ip("10.96.0.7")])
        );
        assert_eq!(
            ask("a1-w0.dp-workers.ns.svc.cluster.local", TYPE_A),
            (0, vec![ip("10.244.0.5")]),
            "a not-ready worker of a Service that publishes not-ready addresses"
        );
        assert_eq!(
            ask("dp-workers.ns.svc.cluster.local", TYPE_A),
            (0, vec![ip("10.244.0.5"), ip("10.244.1.9")])
        );
        assert_eq!(
            ask("web.ns.svc.cluster.local", 28),
            (0, vec![]),
            "AAAA: NODATA"
        );
        assert_eq!(
            ask("a1-w2.dp-workers.ns.svc.cluster.local", TYPE_A).0,
            RCODE_NXDOMAIN
        );
        assert_eq!(ask("web.other.svc.cluster.local", TYPE_A).0, RCODE_NXDOMAIN);
        assert_eq!(
            ask("web.ns.svc.cluster.local.ns.svc.cluster.local", TYPE_A).0,
            RCODE_NXDOMAIN
        );
        assert_eq!(ask("example.com", TYPE_A).0, RCODE_NXDOMAIN);
    }
}
