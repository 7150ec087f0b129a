//! A Redis ACL user for a test cluster: the services connect as a user that
//! may run only what Ordo needs ([`ORDO_ACL_RULES`], the rule documented in
//! docs/configuration.md "Redis ACL user") and the `default` user is turned
//! off, so anything outside the rule fails loudly. A second, unrestricted
//! user lets the test read `ACL LOG` (every denial Redis recorded).

use anyhow::Context as _;
use rand::Rng as _;

/// What the `ordo` ACL user may do: keys and pub/sub channels under `ordo:`
/// (the registry's `ordo:{registry}:*` included) and exactly the commands
/// the services, their Lua scripts (run through EVALSHA, loaded with SCRIPT
/// LOAD) and the `ordo` CLI send.
pub const ORDO_ACL_RULES: &str = "resetkeys ~ordo:* resetchannels &ordo:* -@all \
+ping +hello +select \
+get +set +mget +getdel +del +incr +pexpire +exists +scan +time \
+hget +hmget +hset +hdel +hlen +hscan \
+xadd +xrange +xrevrange \
+spublish +ssubscribe +sunsubscribe \
+evalsha +script|load";

/// The ACL user every service of a cluster connects as.
#[derive(Debug, Clone)]
pub struct AclUser {
    pub name: String,
    pub password: String,
    pub rules: String,
    /// An unrestricted user's password (`testkit-admin`), for the test's own checks.
    pub admin_password: String,
}

fn password() -> String {
    let mut rng = rand::rng();
    (0..32).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)])).collect()
}

impl AclUser {
    /// User `ordo` with [`ORDO_ACL_RULES`] and a fresh password.
    pub fn ordo() -> Self {
        Self { name: "ordo".into(), password: password(), rules: ORDO_ACL_RULES.into(), admin_password: password() }
    }

    /// Creates the users on the server at `url` (as `default`), then turns
    /// `default` off; returns `url` with this user's credentials.
    pub async fn apply(&self, url: &str) -> anyhow::Result<String> {
        let client = redis::Client::open(url).context("the testkit's redis URL")?;
        let mut conn = client.get_multiplexed_async_connection().await.context("connecting as default")?;
        let mut user = redis::cmd("ACL");
        user.arg("SETUSER").arg(&self.name).arg("reset").arg("on").arg(format!(">{}", self.password));
        for rule in self.rules.split_whitespace() {
            user.arg(rule);
        }
        let () = user.query_async(&mut conn).await.context("ACL SETUSER for the ordo user")?;
        let () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("testkit-admin")
            .arg("reset")
            .arg("on")
            .arg(format!(">{}", self.admin_password))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async(&mut conn)
            .await
            .context("ACL SETUSER testkit-admin")?;
        let () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("off")
            .query_async(&mut conn)
            .await
            .context("ACL SETUSER default off")?;
        Ok(with_credentials(url, &self.name, &self.password))
    }

    /// `url` with the unrestricted test user's credentials.
    pub fn admin_url(&self, url: &str) -> String {
        with_credentials(url, "testkit-admin", &self.admin_password)
    }
}

/// `scheme://host:port…` as `scheme://user:password@host:port…`.
pub fn with_credentials(url: &str, user: &str, password: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{user}:{password}@{rest}"),
        None => format!("redis://{user}:{password}@{url}"),
    }
}
