//! berth-proxy's upstream HTTP/1.1 client against upstreams that answer with
//! hand-written bytes: every framing, keep-alive reuse, connections the
//! upstream closed, early answers to uploads and bodies cut short. Clients
//! reach the proxy over real TLS on 127.0.0.1.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper::Request;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const A: &str = "a.example.com";

/// An upstream running `f` on each accepted connection (with its index);
/// also returns how many connections it accepted.
async fn raw_backend<F, Fut>(f: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let i = n.fetch_add(1, SeqCst);
            tokio::spawn(f(s, i));
        }
    });
    (addr, accepted)
}

/// Reads one request head; None at end of stream.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8(head).unwrap())
}

async fn start(upstream: SocketAddr) -> Harness {
    let pki = Pki::new();
    let c = berth_protocol::proxy::ProxyConfig {
        revision: 1,
        certs: vec![pki.proxy_cert(A)],
        http_routes: vec![route(A, &[upstream])],
        ..Default::default()
    };
    Harness::start(pki, &c).await
}

/// Sends a request and collects the body; status 0 if no response head
/// came, Err if the body broke off.
async fn fetch(
    s: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    method: &str,
    path: &str,
) -> (u16, hyper::HeaderMap, Result<Bytes, String>) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", A)
        .body(full(""))
        .unwrap();
    let resp = match s.send_request(req).await {
        Ok(r) => r,
        Err(e) => return (0, hyper::HeaderMap::new(), Err(e.to_string())),
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, headers, body)
}

#[tokio::test]
async fn every_response_framing_arrives_whole_over_one_kept_alive_connection() {
    let (up, accepted) = raw_backend(|mut s, _| async move {
        while let Some(head) = read_head(&mut s).await {
            let path = head.split(' ').nth(1).unwrap().to_string();
            let resp: &[u8] = match path.as_str() {
                "/length" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                "/chunked" => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n"
                }
                "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
                "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                "/te-and-length" => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                }
                _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            };
            s.write_all(resp).await.unwrap();
        }
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    for _ in 0..3 {
        let (st, _, body) = fetch(&mut c, "GET", "/length").await;
        assert_eq!((st, body.unwrap()), (200, Bytes::from("hello")));
        let (st, _, body) = fetch(&mut c, "GET", "/chunked").await;
        assert_eq!((st, body.unwrap()), (200, Bytes::from("hello world")));
        let (st, hd, body) = fetch(&mut c, "HEAD", "/head").await;
        assert_eq!((st, body.unwrap()), (200, Bytes::new()));
        assert_eq!(
            hd["content-length"], "5",
            "HEAD keeps the length of what GET would send"
        );
        let (st, _, body) = fetch(&mut c, "GET", "/empty").await;
        assert_eq!((st, body.unwrap()), (204, Bytes::new()));
        let (st, _, body) = fetch(&mut c, "GET", "/continue").await;
        assert_eq!((st, body.unwrap()), (200, Bytes::from("ok")), "interim 100 skipped");
        let (st, hd, body) = fetch(&mut c, "GET", "/te-and-length").await;
        assert_eq!(
            (st, body.unwrap()),
            (200, Bytes::from("abc")),
            "chunked wins over Content-Length"
        );
        assert_ne!(hd.get("content-length").map(|v| v.as_bytes()), Some(&b"99"[..]));
    }
    // The answer with both Transfer-Encoding and Content-Length is read by
    // its chunks but its connection is never reused (RFC 9112 §6.3).
    assert_eq!(
        accepted.load(SeqCst),
        3,
        "18 requests, one upstream connection per round"
    );
}

#[tokio::test]
async fn a_response_delimited_by_close_arrives_whole_and_the_connection_is_not_reused() {
    let (up, accepted) = raw_backend(|mut s, i| async move {
        read_head(&mut s).await.unwrap();
        let body = format!("connection {i}: {}", "x".repeat(100_000));
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
            .await
            .unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    for i in 0..2 {
        let (st, _, body) = fetch(&mut c, "GET", "/").await;
        let body = body.unwrap();
        assert_eq!(st, 200);
        assert_eq!(body.len(), 100_000 + format!("connection {i}: ").len());
        assert!(body.starts_with(format!("connection {i}: ").as_bytes()));
    }
    assert_eq!(accepted.load(SeqCst), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced_without_an_error() {
    // Each connection answers one request and keeps the connection "alive",
    // then closes it, as an upstream whose keep-alive timeout expired.
    let (up, accepted) = raw_backend(|mut s, i| async move {
        read_head(&mut s).await.unwrap();
        let body = format!("conn {i}");
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        s.write_all(resp.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    for i in 0..4 {
        let (st, _, body) = fetch(&mut c, "GET", "/").await;
        assert_eq!((st, body.unwrap()), (200, Bytes::from(format!("conn {i}"))));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(accepted.load(SeqCst), 4);
    let m = h.proxy.shared().metrics.render();
    assert!(
        m.contains("berth_proxy_ejections_total 0\n"),
        "a closed idle connection is no failure: {m}"
    );
}

#[tokio::test]
async fn an_upstream_that_closes_right_after_answering_is_never_reused_even_for_a_post() {
    // The answer and the close leave together: the proxy reads the answer
    // (a short read, after which it forgets the socket's readiness) and
    // must still see the close before it would send a POST there, which it
    // cannot send again.
    let (up, accepted) = raw_backend(|mut s, i| async move {
        read_head(&mut s).await.unwrap();
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nconn {i}");
        s.write_all(resp.as_bytes()).await.unwrap();
        drop(s);
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    for i in 0..4 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let (st, _, body) = fetch(&mut c, method, "/").await;
        assert_eq!(
            (st, body.unwrap()),
            (200, Bytes::from(format!("conn {i}"))),
            "{method} {i}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(SeqCst), 4);
}

#[tokio::test]
async fn a_request_the_upstream_read_and_dropped_is_sent_again_only_when_idempotent() {
    // Every connection answers its first request, then reads the second and
    // closes without answering: the race with a keep-alive timeout that
    // the idle check cannot see.
    let (up, accepted) = raw_backend(|mut s, i| async move {
        read_head(&mut s).await.unwrap();
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nconn {i}");
        s.write_all(resp.as_bytes()).await.unwrap();
        read_head(&mut s).await;
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    let (st, _, body) = fetch(&mut c, "GET", "/").await;
    assert_eq!((st, body.unwrap()), (200, Bytes::from("conn 0")));
    let (st, _, body) = fetch(&mut c, "GET", "/").await;
    assert_eq!(
        (st, body.unwrap()),
        (200, Bytes::from("conn 1")),
        "GET sent again on a new connection"
    );
    assert_eq!(accepted.load(SeqCst), 2);
    let (st, _, _) = fetch(&mut c, "POST", "/").await;
    assert_eq!(st, 502, "a POST the upstream may have seen is not sent twice");
    assert_eq!(accepted.load(SeqCst), 2);
    let m = h.proxy.shared().metrics.render();
    assert!(
        m.contains("berth_proxy_ejections_total 0\n"),
        "a keep-alive race is no failure: {m}"
    );
    let (st, _, body) = fetch(&mut c, "GET", "/").await;
    assert_eq!(
        (st, body.unwrap()),
        (200, Bytes::from("conn 2")),
        "the upstream stays in rotation"
    );
}

#[tokio::test]
async fn a_body_cut_short_breaks_the_client_response_and_the_next_request_works() {
    let (up, _) = raw_backend(|mut s, i| async move {
        while read_head(&mut s).await.is_some() {
            if i == 0 {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..")
                    .await
                    .unwrap();
                return;
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfine")
                .await
                .unwrap();
        }
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    let (st, _, body) = fetch(&mut c, "GET", "/").await;
    assert!(body.is_err(), "a truncated body must not look complete: {st} {body:?}");
    let mut c = h.h1(A).await;
    let (st, _, body) = fetch(&mut c, "GET", "/").await;
    assert_eq!((st, body.unwrap()), (200, Bytes::from("fine")));
}

#[tokio::test]
async fn an_early_answer_to_an_upload_reaches_the_client() {
    let h = start(refusing_backend("transfer-encoding: chunked").await).await;
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    // 64 MiB, far more than socket buffers hold: the proxy must stop sending.
    tokio::spawn(async move {
        for _ in 0..1024 {
            if tx.send(Bytes::from(vec![1u8; 64 * 1024])).await.is_err() {
                return;
            }
        }
    });
    let mut c = h.h1(A).await;
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", A)
        .body(ChannelBody(rx).boxed())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.send_request(req))
        .await
        .expect("answered while the upload was still going")
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "too large");
}

#[tokio::test]
async fn an_early_answer_survives_the_close_while_the_client_still_sends() {
    // As above, but the client reads only after sending for a while, as a
    // client busy with a large upload does. The proxy closes the connection
    // after the 413 without reading the rest of the body: closing a socket
    // with unread bytes sends a reset, and the client's next write fails.
    let h = start(refusing_backend("content-length: 67108864").await).await;
    let mut tls = h.tls(A, &[b"http/1.1"]).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: {A}\r\ncontent-length: {}\r\n\r\n",
        64 << 20
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // The proxy answers within this while the client goes on sending. A
    // write that fails here is what a client such as hyper's reports
    // instead of the answer (a broken pipe): the proxy must go on taking
    // the upload (and throw it away) until it closes for good.
    let piece = vec![1u8; 64 * 1024];
    let sending = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if let Err(e) = tls.write_all(&piece).await {
                return e;
            }
        }
    })
    .await;
    assert!(sending.is_err(), "the upload broke off: {:?}", sending.unwrap());
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("the proxy closed the connection after its answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok(),
        "the answer was lost to a reset: {read:?}, read before it: {answer:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.ends_with("too large"), "{answer}");
}

/// An upstream that refuses every upload with a 413 after its head (which
/// must contain `expect`), lingering (reading and discarding) so that its
/// answer is not lost to a reset.
async fn refusing_backend(expect: &'static str) -> SocketAddr {
    let (up, _) = raw_backend(move |mut s, _| async move {
        let head = read_head(&mut s).await.unwrap();
        assert!(head.contains(expect), "{head}");
        s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large")
            .await
            .unwrap();
        let _ = s.shutdown().await;
        let mut sink = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        })
        .await;
    })
    .await;
    up
}

/// Reads a chunked request body to its end; returns the data's length.
async fn read_chunked(s: &mut TcpStream) -> usize {
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut b).await.unwrap();
            line.push(b[0]);
        }
        let size = usize::from_str_radix(std::str::from_utf8(&line[..line.len() - 2]).unwrap(), 16).unwrap();
        let mut data = vec![0u8; size + 2];
        s.read_exact(&mut data).await.unwrap();
        if size == 0 {
            return total;
        }
        total += size;
    }
}

/// A streaming request body of `pieces` × 64 KiB.
fn upload(pieces: usize) -> TestBody {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        for _ in 0..pieces {
            if tx.send(Bytes::from(vec![1u8; 64 * 1024])).await.is_err() {
                return;
            }
        }
    });
    ChannelBody(rx).boxed()
}

async fn post(
    c: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    body: TestBody,
) -> (u16, hyper::HeaderMap, String) {
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", A)
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), c.send_request(req))
        .await
        .expect("an answer")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the whole response body")
        .unwrap()
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn interim_answers_during_an_upload_do_not_stop_the_body() {
    // 103 Early Hints and a 100 Continue split over two writes, before the
    // upstream reads the body; the final answer counts what arrived.
    let (up, _) = raw_backend(|mut s, _| async move {
        read_head(&mut s).await.unwrap();
        s.write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 100 Cont")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b"inue\r\n\r\n").await.unwrap();
        let n = read_chunked(&mut s).await;
        let body = format!("received {n}");
        let resp = format!("HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        s.write_all(resp.as_bytes()).await.unwrap();
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    let (st, _, body) = post(&mut c, upload(32)).await;
    assert_eq!((st, body.as_str()), (201, "received 2097152"));
}

#[tokio::test]
async fn a_success_answered_before_the_body_ends_still_gets_the_whole_body() {
    // Full duplex: the upstream answers 200 at once, streams a first chunk,
    // then reads the whole 4 MiB body and reports its size as the last chunk.
    let (up, _) = raw_backend(|mut s, _| async move {
        read_head(&mut s).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\nstarted \r\n")
            .await
            .unwrap();
        let n = read_chunked(&mut s).await.to_string();
        let last = format!("{:x}\r\n{n}\r\n0\r\n\r\n", n.len());
        s.write_all(last.as_bytes()).await.unwrap();
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    let (st, _, body) = post(&mut c, upload(64)).await;
    assert_eq!((st, body.as_str()), (200, "started 4194304"));
}

#[tokio::test]
async fn content_length_is_passed_on_as_one_number_and_odd_codings_are_refused() {
    let (up, _) = raw_backend(|mut s, _| async move {
        while let Some(head) = read_head(&mut s).await {
            let resp: &[u8] = if head.starts_with("GET /list ") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 5, 005\r\n\r\nhello"
            } else {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nnot really gzip"
            };
            s.write_all(resp).await.unwrap();
        }
    })
    .await;
    let h = start(up).await;
    let mut c = h.h1(A).await;
    let (st, hd, body) = fetch(&mut c, "GET", "/list").await;
    assert_eq!((st, body.unwrap()), (200, Bytes::from("hello")));
    assert_eq!(hd["content-length"], "5");
    let (st, _, _) = fetch(&mut c, "GET", "/gzip").await;
    assert_eq!(st, 502, "a coding the client would get undecoded and unlabelled");
}
