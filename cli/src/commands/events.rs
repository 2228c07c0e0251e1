//! `berth events`.

use crate::args::EventsArgs;
use berth_client::{AdminClient, EventsQuery};
use berth_protocol::event::Event;
use std::io::Write;

/// `YYYY-MM-DD HH:MM:SS.mmm` (UTC) of Unix milliseconds.
fn utc(ms: i64) -> String {
    let t = berth_protocol::time::Utc::from_millis(ms);
    format!("{}.{:03}", t.date_time(' '), t.milli)
}

fn render(e: &Event) -> String {
    let mut about = String::new();
    if let Some(s) = &e.service {
        about.push_str(s);
    }
    if let Some(n) = &e.node {
        if !about.is_empty() {
            about.push(' ');
        }
        about.push('@');
        about.push_str(n);
    }
    format!("{}  {:<11} {:<16} {}", utc(e.at_ms), e.kind.as_str(), about, e.message)
}

pub async fn run(api: &AdminClient, a: EventsArgs) -> anyhow::Result<()> {
    let q = EventsQuery {
        follow: a.follow,
        service: a.service,
        tail: Some(a.tail),
        after: None,
    };
    let mut out = std::io::stdout().lock();
    let mut closed = false;
    api.events(&q, |e| {
        if closed {
            return;
        }
        let text = if a.json {
            serde_json::to_string(&e).unwrap_or_default()
        } else {
            render(&e)
        };
        closed = writeln!(out, "{text}").and_then(|_| out.flush()).is_err();
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::event::EventKind;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_764_720_000_123), "2025-12-03 00:00:00.123");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn an_event_is_one_line() {
        let e = Event {
            id: 1,
            at_ms: 0,
            kind: EventKind::Health,
            service: Some("web".into()),
            node: Some("n1".into()),
            message: "web-3 unhealthy: GET / 503".into(),
        };
        assert_eq!(
            render(&e),
            "1970-01-01 00:00:00.000  health      web @n1          web-3 unhealthy: GET / 503"
        );
    }
}
