//! The text log line, formatted without `core::fmt` where it can be avoided.
//!
//! One access line per connection is written by default, on the worker that served the
//! connection. Formatted by tracing-subscriber's generic `Full` format and `DefaultFields`
//! it cost about 16,700 instructions, and the connection's span (`listener=.. client=..`)
//! 4,900 more: together half of everything l4lb's own code did for a proxied connection
//! (callgrind, `Connection: close` load). The generic code sends the timestamp, every
//! integer and every `name=` through `core::fmt` and its padding and styling machinery.
//! This writes the very same bytes (a test holds the two side by side) with a timestamp
//! that fills a fixed buffer, integers by `itoa`, and `str` values quoted directly when
//! they need no escaping; what arrives as `dyn Debug` (addresses, errors) still goes
//! through `core::fmt`.
//!
//! Field names are never styled (the generic format makes them italic on a terminal):
//! a span's fields are formatted once and shared by every layer, the terminal's and an
//! access log file's alike, and a file must not get escape codes. With colours (a
//! terminal), and for records of the `log` crate, the rest of the line is the generic
//! format's.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The `Full` text format of tracing-subscriber (timestamp, level, span scope with its
/// fields, target, fields), byte for byte when uncoloured.
#[derive(Default)]
pub struct TextLine {
    coloured: Format<Full>,
}

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // Colours, and events from the `log` crate (their real target and place are
        // fields the generic format unpacks), take the generic path: neither is an
        // access line.
        if writer.has_ansi_escapes() || meta.target() == "log" {
            return self.coloured.format_event(ctx, writer, event);
        }
        write_timestamp(&mut writer, std::time::SystemTime::now())?;
        writer.write_str(level(meta.level()))?;
        writer.write_char(' ')?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// `name=value` pairs separated by spaces, as `DefaultFields` writes them without colours:
/// for events and for spans (formatted once when the span is created).
#[derive(Default)]
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Fields {
            sanitize: writer.sanitizes_ansi_escapes(),
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// The level as `Full` pads it (five columns, right-aligned).
fn level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// `2026-12-07T22:40:01.123456Z ` as tracing-subscriber's system time writes it, from a
/// fixed buffer (humantime's RFC 3339 with microseconds). A clock humantime cannot format
/// (before 1970, which it would panic on, or after 9999, which it refuses) is written by
/// the generic timer, as before.
fn write_timestamp(writer: &mut Writer<'_>, now: std::time::SystemTime) -> fmt::Result {
    // Seconds from 1970 to 10000-01-01T00:00:00Z.
    const YEAR_10000: std::time::Duration = std::time::Duration::from_secs(253_402_300_800);
    let in_range = now
        .duration_since(std::time::UNIX_EPOCH)
        .is_ok_and(|since| since < YEAR_10000);
    if in_range {
        write!(writer, "{}", humantime::format_rfc3339_micros(now))?;
    } else {
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &tracing_subscriber::fmt::time::SystemTime,
            writer,
        )?;
    }
    writer.write_char(' ')
}

/// The visitor behind [`TextFields`].
struct Fields<'a> {
    writer: Writer<'a>,
    /// Escape what a terminal would act on (the writer's setting; on by default).
    sanitize: bool,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_> {
    /// Starts a field: the separating space, then `name=` (nothing for the message).
    fn start(&mut self, field: &Field) -> fmt::Result {
        if self.first {
            self.first = false;
        } else {
            self.writer.write_char(' ')?;
        }
        let name = field.name();
        if name == "message" {
            return Ok(());
        }
        self.writer
            .write_str(name.strip_prefix("r#").unwrap_or(name))?;
        self.writer.write_char('=')
    }

    fn record(&mut self, field: &Field, write: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        // A `log` record's metadata, carried as fields: the generic format skips them.
        if self.result.is_ok() && !field.name().starts_with("log.") {
            self.result = self.start(field).and_then(|()| write(&mut self.writer));
        }
    }
}

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
            return;
        }
        // `{:?}` of a str: quoted, with quotes, backslashes and control characters
        // escaped. Plain printable ASCII (a pool name, an `end`) needs none of it.
        let plain = value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
        self.record(field, |w| {
            if plain {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            } else {
                write!(w, "{value:?}")
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" && self.sanitize {
            // Escaped as tracing-subscriber escapes a message (terminal injection).
            self.record(field, |w| write!(Escaping(w), "{value:?}"));
        } else {
            self.record(field, |w| write!(w, "{value:?}"));
        }
    }

    /// As the generic format: the error escaped, then its chain as `name.sources=[..]`.
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let sanitize = self.sanitize;
        let error = Escaped(value, sanitize);
        match value.source() {
            Some(source) => self.record(field, |w| {
                let sources = Sources(source, sanitize);
                write!(w, "{error} {}.sources={sources}", field.name())
            }),
            None => self.record(field, |w| write!(w, "{error}")),
        }
    }
}

/// An error's `Display`, escaped when asked.
struct Escaped<'e>(&'e (dyn std::error::Error + 'static), bool);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(Escaping(f), "{}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An error's sources, outermost first: `[first, second]`.
struct Sources<'e>(&'e (dyn std::error::Error + 'static), bool);

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(error) = next {
            list.entry(&Escaped(error, self.1));
            next = error.source();
        }
        list.finish()
    }
}

/// Writes through, escaping the characters a terminal would act on, exactly as
/// tracing-subscriber does for a message and an error.
struct Escaping<W>(W);

impl<W: Write> Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !s.chars().any(needs_escape) {
            return self.0.write_str(s);
        }
        for ch in s.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                ch if needs_escape(ch) => write!(self.0, "\\u{{{:x}}}", ch as u32)?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

fn needs_escape(ch: char) -> bool {
    matches!(
        ch,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Collects what a layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// The line without its timestamp (the two layers read the clock apart).
    fn after_timestamp(line: &str) -> &str {
        line.split_once(' ').map_or("", |(_, rest)| rest)
    }

    fn emit_access_like_events() {
        let peer: std::net::SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let backend: std::net::SocketAddr = "[2001:db8::1]:9000".parse().unwrap();
        tracing::info!(target: "l4lb::main", workers = 2u64, "outside any span");
        let span = tracing::info_span!(
            "conn",
            listener = %"web",
            client = %peer,
            late = tracing::field::Empty
        );
        span.record("late", 5u64);
        let _entered = span.enter();
        let error: Option<std::io::ErrorKind> = None;
        tracing::info!(
            target: "access",
            source = Option::<tracing::field::DisplayValue<&str>>::None,
            pool = %"p",
            sni = Some("a \"quoted\" \\ name\u{1b}[31m"),
            backend = %backend,
            bytes_in = 118u64,
            bytes_out = u64::MAX,
            duration_ms = 0u64,
            end = "closed",
            error = ?error,
            spliced_bytes = 0u64,
            "connection closed"
        );
        tracing::warn!(
            target: "access",
            delta = -3i64,
            flag = true,
            r#type = "x",
            error = ?Some(std::io::ErrorKind::ConnectionReset),
            "odd \u{1b}[2J \u{85} message"
        );
        tracing::info!(target: "access", "message only");
        let chained = Outer(Inner);
        tracing::warn!(
            target: "access",
            error = &chained as &(dyn std::error::Error + 'static),
            r#cause = &Inner as &(dyn std::error::Error + 'static),
            "with errors"
        );
        let inner = tracing::debug_span!("probe", check = "tcp");
        inner.in_scope(|| tracing::error!(target: "l4lb::health", ok = false, "nested"));
    }

    /// An error with a source, both with characters a terminal would act on.
    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer \x1b[1mbold")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner \u{9b}")
        }
    }

    impl std::error::Error for Inner {}

    /// The lines one layer writes for [`emit_access_like_events`]. One subscriber per
    /// layer: two layers with the same field formatter in one subscriber would both append
    /// a span's later-recorded fields to the one shared copy.
    fn lines_of<L>(layer: impl FnOnce(Captured) -> L) -> Vec<String>
    where
        L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
    {
        let out = Captured::default();
        let subscriber = tracing_subscriber::registry().with(layer(out.clone()));
        tracing::subscriber::with_default(subscriber, emit_access_like_events);
        out.lines()
    }

    /// What [`TextLine`] with [`TextFields`] writes, with colours or without.
    fn text_line_lines(ansi: bool) -> Vec<String> {
        lines_of(|w| {
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .event_format(TextLine::default())
                .fmt_fields(TextFields)
                .with_writer(w)
        })
    }

    #[test]
    fn writes_what_the_generic_full_format_writes() {
        let generic = lines_of(|w| {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(w)
        });
        let fast = text_line_lines(false);
        assert_eq!(generic.len(), 6, "{generic:?}");
        assert_eq!(fast.len(), generic.len(), "{fast:?}");
        for (g, f) in generic.iter().zip(&fast) {
            assert_eq!(after_timestamp(f), after_timestamp(g));
            let (g_time, f_time) = (&g[..g.find(' ').unwrap()], &f[..f.find(' ').unwrap()]);
            // Same shape: 2026-12-07T22:40:01.123456Z
            assert_eq!(f_time.len(), g_time.len(), "{f_time} vs {g_time}");
            assert_eq!(f_time.as_bytes()[10], b'T');
            assert!(f_time.ends_with('Z'));
        }
        assert!(
            fast[1].contains(
                "conn{listener=web client=192.0.2.7:40000 late=5}: access: connection closed pool=p"
            ),
            "{}",
            fast[1]
        );
        assert!(
            fast[4].ends_with(
                "with errors error=outer \\x1b[1mbold error.sources=[inner \\u{9b}] cause=inner \\u{9b}"
            ),
            "{}",
            fast[4]
        );
    }

    /// With colours the line is the generic format's (the level coloured), field names
    /// left plain.
    #[test]
    fn with_colours_is_the_generic_format_with_plain_field_names() {
        let generic = lines_of(|w| {
            tracing_subscriber::fmt::layer()
                .with_ansi(true)
                .fmt_fields(TextFields)
                .with_writer(w)
        });
        let fast = text_line_lines(true);
        assert_eq!(fast.len(), 6, "{fast:?}");
        for (g, f) in generic.iter().zip(&fast) {
            assert_eq!(after_timestamp(f), after_timestamp(g));
        }
        assert!(fast[1].contains("\x1b[32m INFO\x1b[0m"), "{:?}", fast[1]);
        assert!(
            fast[1].contains("connection closed pool=p sni="),
            "{:?}",
            fast[1]
        );
    }

    #[test]
    fn timestamp_is_rfc3339_with_microseconds_in_utc() {
        let mut out = String::new();
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_796_683_201, 123_456_789);
        write_timestamp(&mut Writer::new(&mut out), at).unwrap();
        assert_eq!(out, "2026-12-07T22:40:01.123456Z ");
        // Out of humantime's range (it would panic before 1970): the generic timer, which
        // reads the clock itself, writes the line's time instead.
        for broken in [
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(1),
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800),
        ] {
            let mut out = String::new();
            write_timestamp(&mut Writer::new(&mut out), broken).unwrap();
            assert_eq!(out.len(), "2026-12-07T22:40:01.123456Z ".len(), "{out}");
            assert!(out.ends_with("Z "), "{out}");
        }
    }
}
