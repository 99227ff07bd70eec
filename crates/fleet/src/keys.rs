//! The key layout of one fleet under its prefix `P`, and the parsing of keys back.
//!
//! - `P/config`: the fleet document (YAML, `routes:`), written by `canary fleet push`.
//! - `P/leader`: the elected leader (`{member, admin, boot_id}`), on the leader's lease;
//!   its create revision is the fencing token of every leader write.
//! - `P/members/<member>`: each member (`{admin, boot_id, started_ms}`), on its lease.
//! - `P/routes/<route>/state`: a route's rollout state (leader only, fenced).
//! - `P/routes/<route>/manual`: a route's manual weight (leader only, fenced).
//! - `P/journal/<route>/<seq:020>`: the journal, one event per key (leader only).
//! - `P/breaker/<route>/<member>`: a breaker trip reported by a member.

/// The keys of one fleet.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Config,
    Leader,
    Member(String),
    State(String),
    Manual(String),
    Journal(String, u64),
    Breaker(String, String),
    /// Anything else under the prefix: ignored.
    Other,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The prefix with a trailing `/`, for ranges and watches (so `/p` does not also
    /// cover `/p2`).
    pub fn range(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }
    pub fn member(&self, m: &str) -> String {
        format!("{}/members/{m}", self.prefix)
    }
    pub fn state(&self, route: &str) -> String {
        format!("{}/routes/{route}/state", self.prefix)
    }
    pub fn manual(&self, route: &str) -> String {
        format!("{}/routes/{route}/manual", self.prefix)
    }
    pub fn journal(&self, route: &str, seq: u64) -> String {
        format!("{}/journal/{route}/{seq:020}", self.prefix)
    }
    pub fn breaker(&self, route: &str, member: &str) -> String {
        format!("{}/breaker/{route}/{member}", self.prefix)
    }

    /// What `key` is.
    pub fn parse(&self, key: &str) -> Key {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Key::Other;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["config"] => Key::Config,
            ["leader"] => Key::Leader,
            ["members", m] => Key::Member(m.to_string()),
            ["routes", r, "state"] => Key::State(r.to_string()),
            ["routes", r, "manual"] => Key::Manual(r.to_string()),
            ["journal", r, seq] => seq
                .parse()
                .map_or(Key::Other, |s| Key::Journal(r.to_string(), s)),
            ["breaker", r, m] => Key::Breaker(r.to_string(), m.to_string()),
            _ => Key::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back_to_what_it_is() {
        let k = Keys::new("/canary/prod/");
        assert_eq!(k.range(), "/canary/prod/");
        assert_eq!(k.parse(&k.config()), Key::Config);
        assert_eq!(k.parse(&k.leader()), Key::Leader);
        assert_eq!(k.parse(&k.member("p1")), Key::Member("p1".into()));
        assert_eq!(k.parse(&k.state("web")), Key::State("web".into()));
        assert_eq!(k.parse(&k.manual("web")), Key::Manual("web".into()));
        assert_eq!(
            k.journal("web", 7),
            "/canary/prod/journal/web/00000000000000000007"
        );
        assert_eq!(k.parse(&k.journal("web", 7)), Key::Journal("web".into(), 7));
        assert_eq!(
            k.parse(&k.breaker("web", "p2")),
            Key::Breaker("web".into(), "p2".into())
        );
        // Zero-padded, so key order is sequence order: the leader trims a journal with
        // one range delete [journal(r, 0), journal(r, n)).
        assert!(k.journal("web", 9) < k.journal("web", 10));
        assert!(k.journal("web", 99_999) < k.journal("web", 100_000));
        assert_eq!(k.parse("/canary/prod2/config"), Key::Other);
        assert_eq!(k.parse("/canary/prod/journal/web/x"), Key::Other);
    }
}
