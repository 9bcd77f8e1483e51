//! Our proxy behind the netfilter rules an unmodified upstream node agent installs
//! (inpod-rules.md), with no engine at all: connections arrive NAT-redirected to the
//! listeners' own ports, and the proxy finds where they were going with SO_ORIGINAL_DST.

use std::net::SocketAddr;

use redirect_tests::*;
use redirect_user::proxy::relay::Relay;

#[test]
fn our_proxy_serves_pods_redirected_by_the_netfilter_rules() {
    // The engine of the Mesh fixture is left unused: no pod is enrolled with it.
    let m = Mesh::new("nf", &[("a", 10), ("c", 100)]).unwrap();
    let a = m.ns("a");
    netfilter::enrol(&a, &netfilter::rules_v6()).unwrap();
    let listeners = PodListeners::open(&a, false).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let relay = {
        let _g = m.rt.enter();
        Relay::start("a", m.ns("a"), listeners, Some(tx)).unwrap()
    };
    for v6 in [false, true] {
        // Outbound: REDIRECT to 15001; the relay reaches the original destination.
        let to = m.addr("c", v6, PEER_PORT);
        let answer = ask(&a, to).unwrap();
        assert!(answer.starts_with("c from "), "{answer}");
        let ev = rx.try_recv().unwrap();
        assert_eq!((ev.listener, ev.local), (15001, to));
        // Inbound: REDIRECT to 15006; the app sees the client's address.
        let to = m.addr("a", v6, APP_PORT);
        let answer = ask(&m.ns("c"), to).unwrap();
        let client = SocketAddr::new(m.host("c").addr(v6), 0).ip().to_string();
        assert!(
            answer.starts_with("a from ") && answer.contains(&client),
            "{answer}"
        );
        let ev = rx.try_recv().unwrap();
        assert_eq!((ev.listener, ev.local), (15006, to));
    }
    m.rt.block_on(relay.stop());
    netfilter::unenrol(&a).unwrap();
}
