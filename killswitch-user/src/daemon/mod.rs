//! `killswitch daemon`: applies the policy like `up`, then keeps the pinned scope current —
//! tunnels appearing and disappearing, hostnames re-resolved, the config reloaded on SIGHUP, drop
//! events logged. It never removes enforcement: stopping or killing it leaves the scope as it is.

pub mod links;

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    time::Instant,
};

use killswitch_common::InterfaceKey;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use self::links::LinkWatcher;
use crate::{
    backend::{self, nftables, Backend, Choice},
    ebpf::pins,
    ebpf::pins::ScopeLock,
    ebpf::{self, InterfaceEntries, MapEntries, PinnedMaps},
    error::{Error, Result},
    events::{EventReader, Resolver},
    interfaces,
    policy::{lookup, Lookup, Policy},
    scope::Scope,
    servers::{ResolvedServers, COMMAND_OWNS_THE_LIST},
    vpn_client::{self, ClientCgroup},
};

/// Runs until SIGTERM or SIGINT. Errors of the first apply are returned (a scope that was not
/// enforced is then in lockdown); later ones are logged and the enforcement in place stays.
pub fn run(config: &Path, scope: Scope, choice: Choice) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::kernel("cannot start the event loop", e))?;
    if choice != Choice::Nftables {
        ebpf::warm_up();
    }
    runtime.block_on(async move {
        for _ in 0..RELOAD_TRIES {
            let Some((policy, stamp)) = first_valid_policy(config, &scope, choice).await? else {
                return Ok(());
            };
            let start = Daemon::start(
                config.to_path_buf(),
                stamp,
                scope.clone(),
                policy,
                choice,
                false,
            );
            if let Some(mut daemon) = start.await? {
                return daemon
                    .serve(std::pin::pin!(std::future::pending()), None)
                    .await;
            }
        }
        Err(changing(config))
    })
}

/// The config to start with. While it cannot be used, the scope is held in lockdown (if nothing
/// enforced it yet; otherwise what is in force stays) and the daemon waits for SIGHUP. `None`:
/// told to stop while waiting.
async fn first_valid_policy(
    config: &Path,
    scope: &Scope,
    choice: Choice,
) -> Result<Option<(Policy, Stamp)>> {
    let mut hangup = signal(SignalKind::hangup()).map_err(signal_error)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    loop {
        let stamp = Stamp::of(config);
        match Policy::load(config) {
            Ok(policy) => return Ok(Some((policy.for_scope(scope.is_system_wide()), stamp))),
            Err(e) => {
                let e = backend::lock_down(choice, scope, e.into());
                tracing::error!("{e}; waiting for SIGHUP to read the config again");
            }
        }
        tokio::select! {
            _ = hangup.recv() => {}
            _ = terminate.recv() => return Ok(None),
            _ = interrupt.recv() => return Ok(None),
        }
    }
}

/// Readings of a config file that keeps changing under a reload (or a start) before it gives up.
const RELOAD_TRIES: usize = 3;

fn changing(config: &Path) -> Error {
    Error::Runtime(format!(
        "{} kept changing while it was read; the policy in force stays",
        config.display()
    ))
}

/// How long a file whose reload was refused or failed is left alone while neither it nor the
/// policy in force changes (SIGHUP always reads it).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// What the config file looked like when it was read (a cheap `stat`): when it changes, `up`
/// may have applied the new one, so the daemon reads it again before it writes anything, rather
/// than put back what an older config allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp(Option<(u64, u64, u64, i64, i64, i64, i64)>);

impl Stamp {
    fn of(config: &Path) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp(std::fs::metadata(config).ok().map(|m| {
            let (device, inode, size) = (m.dev(), m.ino(), m.size());
            (
                device,
                inode,
                size,
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            )
        }))
    }
}

/// A scope kept current: by `killswitch daemon`, and by `killswitch run` for its app's scope.
pub struct Daemon {
    config: PathBuf,
    /// The config file as it was when the policy in force was read from it.
    stamp: Stamp,
    scope: Scope,
    /// Which backend holds the scope (chosen at start like `up` chooses).
    backend: Backend,
    policy: Policy,
    /// `policy`'s fingerprint, kept: computing it formats the whole policy.
    fingerprint: u64,
    servers: ResolvedServers,
    netns_cookie: u64,
    /// Tunnels in the map, for the log lines.
    tunnels: BTreeMap<InterfaceKey, String>,
    links: LinkWatcher,
    /// The `[vpn_client]` cgroups in force (by id: a cgroup made again is a new one).
    clients: Vec<ClientCgroup>,
    /// The set last failed to put in force (its error is logged once).
    clients_failed: Option<Vec<ClientCgroup>>,
    /// The file and the policy in force when a reload of the file was refused or failed, and
    /// when: not read again for an event until one of them changes or [`RETRY_AFTER`] passed
    /// (a VPN client's cgroups are looked at ten times a second).
    refused: Option<(Stamp, Option<u64>, Instant)>,
    /// The last link event's write failed (a guard not attached, say): tried again each second,
    /// since a device may be left without its guard until then.
    devices_failed: bool,
    /// `killswitch run`'s scope: never a guard ([`Policy::without_guard`]).
    run: bool,
}

impl Daemon {
    /// Applies the policy in `config` to `scope` like `up` (an invalid config is an error
    /// here, and a scope nothing enforced is left in lockdown).
    pub async fn start_for(config: PathBuf, scope: Scope, choice: Choice) -> Result<Daemon> {
        if choice != Choice::Nftables {
            ebpf::warm_up();
        }
        for _ in 0..RELOAD_TRIES {
            let stamp = Stamp::of(&config);
            let policy = match Policy::load(&config) {
                Ok(policy) => policy.without_guard(),
                Err(e) => return Err(backend::lock_down(choice, &scope, e.into())),
            };
            let start = Daemon::start(config.clone(), stamp, scope.clone(), policy, choice, true);
            if let Some(daemon) = start.await? {
                return Ok(daemon);
            }
        }
        Err(changing(&config))
    }

    /// Resolves the policy's names and applies it like `up`. `None`: the file changed since it
    /// was read (an `up` may have applied it while the names were looked up): nothing written,
    /// read it again.
    async fn start(
        config: PathBuf,
        stamp: Stamp,
        scope: Scope,
        policy: Policy,
        choice: Choice,
        run: bool,
    ) -> Result<Option<Daemon>> {
        // Subscribe first: a tunnel that appears while we apply is still seen.
        let links = LinkWatcher::subscribe()?;
        let mut servers = ResolvedServers::for_rules(&policy.servers, None);
        // Like `up`: resolve before the first apply (a name that fails is retried later).
        servers.look_up_all().await;
        if Stamp::of(&config) != stamp {
            tracing::info!(
                "{} changed while it was read: reading it again",
                config.display()
            );
            return Ok(None);
        }
        let mut daemon = Daemon {
            config,
            stamp,
            scope,
            backend: Backend::Ebpf,
            fingerprint: policy.fingerprint(),
            policy,
            servers,
            netns_cookie: interfaces::netns_cookie()?,
            tunnels: BTreeMap::new(),
            links,
            clients: Vec::new(),
            clients_failed: None,
            refused: None,
            devices_failed: false,
            run,
        };
        daemon.clients = vpn_client::current(&daemon.policy);
        let applied = backend::apply(choice, &daemon.scope, &daemon.policy, &mut daemon.servers)?;
        daemon.backend = applied.backend;
        if let Some(entries) = &applied.entries {
            daemon.log_tunnels(&entries.interfaces.tunnels);
        }
        tracing::info!(
            scope = %daemon.scope.name,
            backend = applied.backend.name(),
            servers = applied.servers,
            "daemon started; enforcing {} with {}", daemon.scope.display_cgroup(), applied.backend.name()
        );
        Ok(Some(daemon))
    }

    fn entries(&self) -> Result<MapEntries> {
        let list = interfaces::list()?;
        let mut entries = MapEntries::new(
            &self.policy,
            &list,
            self.netns_cookie,
            &self.servers.endpoints(),
            &vpn_client::current(&self.policy),
            interfaces::guarded(&list, &self.policy),
        );
        entries.server_names = self.servers.record_of_names();
        Ok(entries)
    }

    /// Keeps the scope current until SIGTERM or SIGINT, `until` completes, or the scope is
    /// taken down. With `forward` (`run`'s command), SIGTERM goes to the command instead and
    /// SIGINT is left to it.
    pub async fn serve(
        &mut self,
        mut until: std::pin::Pin<&mut (dyn std::future::Future<Output = ()> + '_)>,
        forward: Option<&dyn Fn(nix::sys::signal::Signal)>,
    ) -> Result<()> {
        let mut hangup = signal(SignalKind::hangup()).map_err(signal_error)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
        // Drop events come from the eBPF programs' ring buffer (nftables logs to the kernel log).
        let mut events = match self.backend {
            Backend::Ebpf => {
                let ring = Ring(EventReader::open(&pins::pin_dir(&self.scope))?);
                // SAFETY: the ring buffer's fd is owned by `ring` and stays open until dropped.
                Some(
                    unsafe { AsyncFd::register(ring) }
                        .map_err(|e| Error::kernel("cannot watch the drop events", e))?,
                )
            }
            Backend::Nftables => None,
        };
        let mut resolver = Resolver::new(&crate::scope::cgroup2_mount()?)?;
        let (answers, mut answered) = mpsc::unbounded_channel();
        // An nftables table can be removed behind our back (`flush ruleset`): looked at each
        // second, and put back (see `table_vanished`).
        let mut look_at_table = every(std::time::Duration::from_secs(1));
        let mut retry_devices = every(std::time::Duration::from_secs(1));
        // A VPN client's cgroup made again (a restarted unit) is a new id: looked for often,
        // since until then the client cannot reach its server (and nothing else can).
        let mut look_at_clients = every(std::time::Duration::from_millis(100));
        // ...and at once when the directory that holds it changes, before the client sends.
        // No cgroup2 mount (an nftables scope of the whole machine): nothing to watch.
        let mount = crate::scope::cgroup2_mount().ok();
        let mut client_watch = mount
            .as_deref()
            .and_then(|m| ClientWatch::new(m, &self.policy));
        loop {
            let failed_before = self.devices_failed;
            let next_lookup = self.servers.next_due();
            let lookup_due =
                tokio::time::sleep_until(next_lookup.unwrap_or_else(Instant::now).into());
            tokio::select! {
                change = self.links.next() => match change {
                    Some(change) => self.interfaces_changed(Some(change)),
                    None => return Err(Error::Runtime("the netlink socket closed".into())),
                },
                _ = hangup.recv() => {
                    self.reload();
                }
                _ = lookup_due, if next_lookup.is_some() => self.look_up_due_names(&answers),
                Some((name, answer)) = answered.recv() => self.name_answered(&name, answer),
                ready = readable(&mut events) => {
                    let Ok(mut guard) = ready else { continue };
                    for event in guard.get_inner_mut().0.drain() {
                        tracing::warn!("{}", resolver.record(&event));
                    }
                    guard.clear_ready();
                }
                _ = look_at_table.tick(), if self.backend == Backend::Nftables => {}
                _ = retry_devices.tick(), if self.devices_failed => self.interfaces_changed(None),
                _ = look_at_clients.tick(), if self.policy.vpn_client.is_some() => {
                    // A watch for the config's directory: new after a reload, or once the
                    // directory is there again (systemd removes an empty slice).
                    if let Some(mount) = mount.as_deref() {
                        let wanted = client_parent(mount, &self.policy);
                        let live = client_watch.as_ref().is_some_and(|w| w.watches(wanted.as_deref()));
                        if !live && wanted.as_ref().is_some_and(|p| p.exists()) {
                            client_watch = ClientWatch::new(mount, &self.policy);
                        }
                    }
                    self.follow_clients();
                }
                ready = watched(&mut client_watch) => {
                    if let Ok(mut guard) = ready {
                        let _ = guard.get_inner().0.read_events();
                        guard.clear_ready();
                    }
                    self.follow_clients();
                }
                _ = &mut until => return Ok(()),
                _ = terminate.recv() => match forward {
                    Some(forward) => forward(nix::sys::signal::Signal::SIGTERM),
                    None => break,
                },
                _ = interrupt.recv(), if forward.is_none() => break,
            }
            // The first retry a second after the failure, not at once.
            if self.devices_failed && !failed_before {
                retry_devices.reset();
            }
            if self.backend == Backend::Nftables
                && !nftables::holds(&self.scope)
                && !nftables::taken_down(&self.scope)
            {
                self.table_vanished();
            }
            // An nftables table that could not be put back is tried again, not given up.
            let taken_down = match self.backend {
                Backend::Nftables => nftables::taken_down(&self.scope),
                Backend::Ebpf => !self.backend.holds(&self.scope),
            };
            if taken_down {
                tracing::info!("{} was taken down; stopping", self.scope.display_cgroup());
                return Ok(());
            }
        }
        tracing::info!(
            "stopping; {} stays enforced until `killswitch down`",
            self.scope.display_cgroup()
        );
        Ok(())
    }

    /// A link appeared, changed or went away (`None`: the last write failed and is tried
    /// again): bring the tunnel and uplink maps up to date (nftables matches names: nothing to
    /// write but the guard's chains).
    fn interfaces_changed(&mut self, change: Option<links::LinkChange>) {
        let started = Instant::now();
        let also = self.links.skip_queued();
        let failed_before = std::mem::take(&mut self.devices_failed);
        // A write failing again each second is said once.
        let report = |e: Error| {
            if failed_before && change.is_none() {
                tracing::debug!("still cannot follow the devices: {e}");
            } else {
                tracing::error!("cannot follow {change:?}: {e}");
            }
        };
        if self.backend == Backend::Nftables {
            let mut followed = self.follow_devices_nftables(false);
            // A refused file leaves the policy in force: when that is this daemon's (the typo
            // is in its own file), it goes on hooking the devices there are. Another's is
            // left as it is (docs/daemon.md: its new devices get no netdev chain).
            if matches!(followed, Ok(Written::ConfigChanged)) && !self.reload_changed_config() {
                followed = self.follow_devices_nftables(true);
            }
            match followed {
                Ok(Written::ConfigChanged) => {}
                Ok(Written::Changes) => tracing::info!(
                    ?change,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "the guard's netdev chains now hook the devices there are"
                ),
                Ok(_) => tracing::debug!(
                    ?change,
                    also,
                    "interfaces changed; the nft rules match names"
                ),
                Err(e) => {
                    report(e);
                    self.devices_failed = true;
                }
            }
            return;
        }
        let mut result = self.write_interfaces(false);
        if matches!(result, Ok(None)) {
            // The reload writes the interfaces too. A refused or failed one writes nothing;
            // the policy in force stays, and when that is this daemon's (the typo is in its
            // own file) it goes on following the devices there are.
            if self.reload_changed_config() {
                return;
            }
            result = self.write_interfaces(true);
        }
        match result {
            Ok(None) => {}
            Ok(Some(entries)) => {
                tracing::debug!(
                    ?change,
                    also,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "interfaces synced"
                );
                self.log_tunnels(&entries.tunnels);
            }
            Err(e) => {
                report(e);
                self.devices_failed = true;
            }
        }
    }

    /// Writes the tunnel and uplink maps, and attaches the guard, under this daemon's policy;
    /// `None` when the file changed (a reload comes first) or, once `reloaded`, when that
    /// policy is not the one in force: then other namespaces stop passing and a device without
    /// a guard gets one that passes nothing, until a write succeeds (an `up` applied another
    /// policy, whose view of a new device the daemon cannot know). Listed under the lock, so a
    /// racing `up` cannot write an older list after ours.
    fn write_interfaces(&self, reloaded: bool) -> Result<Option<InterfaceEntries>> {
        let lock = self.lock()?;
        if !reloaded && self.config_changed() {
            return Ok(None);
        }
        if reloaded && self.in_force() != Some(self.fingerprint) {
            self.switch_guard_off(&lock);
            ebpf::guard_unknown_devices(&pins::pin_dir(&self.scope), self.netns_cookie)?;
            return Ok(None);
        }
        let written = (|| {
            let list = interfaces::list()?;
            let guarded = interfaces::guarded(&list, &self.policy);
            let entries = InterfaceEntries::new(&self.policy, &list, self.netns_cookie, guarded);
            self.maps()?.write_interfaces(&entries)?;
            let pin_dir = pins::pin_dir(&self.scope);
            if self.policy.guarded() {
                ebpf::guard_uplinks(&pin_dir, &entries.guarded)?;
            } else if ebpf::guard::loaded(&pin_dir) {
                // Left by a reload that could not take it away: its map is empty now.
                ebpf::guard::remove(&pin_dir)?;
            }
            Ok(entries)
        })();
        // A device may be left without its guard: other namespaces stop passing.
        if written.is_err() {
            self.switch_guard_off(&lock);
        }
        written.map(Some)
    }

    /// nftables: the guard's netdev chains hook devices by name, and only those there were:
    /// a device that appeared, one renamed, or one that joined a listed bridge gets the table
    /// rendered anew. Once `reloaded` (refused or failed), under this daemon's policy only if
    /// that is the one in force.
    fn follow_devices_nftables(&self, reloaded: bool) -> Result<Written> {
        let _lock = self.nftables_lock()?;
        // Asked first: whether the policy in force has a guard is known only when it is ours.
        let changed = if reloaded {
            self.in_force() != Some(self.fingerprint)
        } else {
            self.config_changed()
        };
        if changed {
            return Ok(Written::ConfigChanged);
        }
        if !self.policy.guarded() {
            return Ok(Written::Nothing);
        }
        let mut now: Vec<(String, u8)> = nftables::guarded(&self.policy)?
            .into_iter()
            .map(|(device, header)| (device.name, header))
            .collect();
        now.sort();
        if now == nftables::frame_devices(&self.scope)? {
            return Ok(Written::Nothing);
        }
        self.apply_nftables()?;
        Ok(Written::Changes)
    }

    /// Renders the nftables table anew (one transaction); a server list set with `servers`
    /// stays the table's. The caller holds the lock.
    fn apply_nftables(&self) -> Result<()> {
        if !nftables::servers_set_by_command(&self.scope) {
            return nftables::apply(&self.scope, &self.policy, &self.servers.endpoints());
        }
        let servers = nftables::read(&self.scope)?.servers();
        nftables::apply(&self.scope, &self.policy, &servers)?;
        // The mark that the list is the command's goes with the table: put it back.
        nftables::set_servers(&self.scope, &servers)
    }

    /// The VPN client cgroups that exist now differ from those in force: the scope trusts
    /// exactly the new ones (a removed cgroup's id is dropped, a new one added).
    fn follow_clients(&mut self) {
        let now = vpn_client::current(&self.policy);
        if now == self.clients {
            return;
        }
        let result: Result<Written> = (|| {
            if self.config_changed() {
                return Ok(Written::ConfigChanged);
            }
            if self.backend == Backend::Nftables {
                // Asked under the lock: a client added to a table `up` just wrote from another
                // policy would widen that policy.
                let lock = self.nftables_lock()?;
                if self.config_changed() {
                    return Ok(Written::ConfigChanged);
                }
                // A new client first, in one nft run: it may be sending already.
                for client in now.iter().filter(|c| !self.clients.contains(c)) {
                    nftables::add_vpn_client(&self.scope, client, &lock)?;
                }
                self.apply_nftables()?;
                return Ok(Written::Changes);
            }
            let _lock = self.lock()?;
            if self.config_changed() {
                return Ok(Written::ConfigChanged);
            }
            let entries = self.entries()?;
            self.maps()?.write_vpn_clients(&entries)?;
            Ok(Written::Changes)
        })();
        match result {
            // The reload writes the clients too.
            Ok(Written::ConfigChanged) => {
                self.reload_changed_config();
            }
            Ok(_) => {
                let paths = |list: &[ClientCgroup]| -> Vec<String> {
                    list.iter()
                        .map(|c| format!("{} (id {})", c.path, c.id))
                        .collect()
                };
                tracing::info!(
                    "VPN client cgroups now: [{}] (were [{}])",
                    paths(&now).join(", "),
                    paths(&self.clients).join(", ")
                );
                self.clients = now;
            }
            Err(e) => {
                // Tried again at every look, said once per change; the clients in force stay.
                if self.clients_failed.as_ref() != Some(&now) {
                    tracing::error!("cannot follow the VPN client's cgroup: {e}");
                    self.clients_failed = Some(now);
                }
            }
        }
    }

    /// The config file changed since it was read, or the policy in force is not the one read
    /// from it (`up` applied another version, or another file). Call under the lock: then
    /// nothing writes an older policy over what `up` just applied.
    fn config_changed(&self) -> bool {
        Stamp::of(&self.config) != self.stamp || self.in_force() != Some(self.fingerprint)
    }

    /// The fingerprint the scope recorded of the policy in force; `None` when none is.
    fn in_force(&self) -> Option<u64> {
        match self.backend {
            Backend::Ebpf => self.maps().ok().and_then(|maps| maps.policy()),
            Backend::Nftables => nftables::policy_in_force(&self.scope),
        }
    }

    /// Whether the reload applied (see [`Daemon::reload`]). A file refused before is not read
    /// again while neither it nor the policy in force changed.
    fn reload_changed_config(&mut self) -> bool {
        if let Some((stamp, in_force, when)) = self.refused {
            if (stamp, in_force) == (Stamp::of(&self.config), self.in_force())
                && when.elapsed() < RETRY_AFTER
            {
                return false;
            }
        }
        tracing::info!(
            "{} changed since it was read, or the policy in force is not the one read from it \
             (`up` may have applied another): reading it again",
            self.config.display()
        );
        self.reload()
    }

    /// The scope's lock; an error once the scope was taken down.
    fn lock(&self) -> Result<ScopeLock> {
        ScopeLock::existing(&self.scope)?.ok_or_else(|| {
            Error::Runtime(format!("{} was taken down", self.scope.display_cgroup()))
        })
    }

    /// Turns the switch that lets other namespaces past the uplink guard off (fail closed; a
    /// no-op without a guard). Only under the lock: the switch rewrites the whole settings
    /// entry, and one read before a racing `up` wrote its own would put back stale bits (a held
    /// tunnel's among them).
    fn switch_guard_off(&self, _lock: &ScopeLock) {
        ebpf::switch_off(&pins::pin_dir(&self.scope));
    }

    /// The nftables scope's lock; an error once the table was taken down.
    fn nftables_lock(&self) -> Result<nftables::Lock> {
        let lock = nftables::lock(&self.scope)?;
        if nftables::holds(&self.scope) {
            Ok(lock)
        } else {
            Err(Error::Runtime(format!(
                "{} was taken down",
                self.scope.display_cgroup()
            )))
        }
    }

    /// The nftables table is gone without a `down` (a `flush ruleset`, a firewall reloading):
    /// put it back at once.
    fn table_vanished(&mut self) {
        tracing::warn!(
            "the nftables table of {} was removed by something other than `killswitch down` (a \
             `flush ruleset`?); applying it again",
            self.scope.display_cgroup()
        );
        let result = nftables::lock(&self.scope).map(|_lock| {
            if nftables::taken_down(&self.scope) {
                return Written::Nothing;
            }
            if self.in_force() != Some(self.fingerprint) {
                // Not this daemon's policy to put back: lockdown at once (it has no guard,
                // docs/guard.md), then the file's if it is valid.
                let cause = Error::Runtime("the table was removed".into());
                tracing::warn!("{}", nftables::lock_down(&self.scope, cause));
                return Written::ConfigChanged;
            }
            // The policy in force was this daemon's: back at once, then the file's if edited.
            if let Err(e) = nftables::apply(&self.scope, &self.policy, &self.servers.endpoints()) {
                tracing::warn!("{}", nftables::lock_down(&self.scope, e));
                return Written::Nothing;
            }
            if self.config_changed() {
                Written::ConfigChanged
            } else {
                Written::Changes
            }
        });
        match result {
            Ok(Written::ConfigChanged) => {
                // Refused or failed, the scope keeps what was put back (lockdown, when the
                // policy in force was not this daemon's).
                self.reload_changed_config();
            }
            Ok(_) => {}
            Err(e) => tracing::error!("cannot apply the table again: {e}"),
        }
    }

    /// The scope's maps as pinned now: opened for each change (a few syscalls), since `up` of
    /// another version may have replaced a map, or the scope been taken down and up again.
    fn maps(&self) -> Result<PinnedMaps> {
        PinnedMaps::open(&pins::pin_dir(&self.scope))
    }

    /// One line per tunnel that came or went since the last call.
    fn log_tunnels(&mut self, tunnels: &BTreeMap<InterfaceKey, String>) {
        for (key, name) in tunnels {
            if !self.tunnels.contains_key(key) {
                tracing::info!(tunnel = %name, ifindex = key.ifindex, "tunnel up: {name} (ifindex {})", key.ifindex);
            }
        }
        for (key, name) in &self.tunnels {
            if !tunnels.contains_key(key) {
                tracing::info!(tunnel = %name, ifindex = key.ifindex, "tunnel gone: {name} (ifindex {})", key.ifindex);
            }
        }
        self.tunnels = tunnels.clone();
    }

    /// SIGHUP: a valid config replaces the policy (maps updated, additions first); an invalid
    /// one is logged and the policy in force stays. Whether the new policy applied.
    fn reload(&mut self) -> bool {
        // A file that changes between its reading and the write is read again: an `up` of the
        // newer one in between would otherwise be overwritten with the older.
        for _ in 0..RELOAD_TRIES {
            if let Some(applied) = self.reload_once() {
                return applied;
            }
        }
        tracing::error!("{}", changing(&self.config));
        false
    }

    /// One reload; `None` when the file changed before the write (nothing written).
    fn reload_once(&mut self) -> Option<bool> {
        let previous_stamp = std::mem::replace(&mut self.stamp, Stamp::of(&self.config));
        let policy = match Policy::load(&self.config) {
            Ok(policy) if self.run => policy.without_guard(),
            Ok(policy) => policy.for_scope(self.scope.is_system_wide()),
            Err(e) => {
                // Seen: an invalid file left what is in force untouched, `up` included.
                self.refused = Some((self.stamp, self.in_force(), Instant::now()));
                tracing::error!("reload refused, the policy in force stays: {e}");
                return Some(false);
            }
        };
        // Names the old config had keep their addresses; new ones are looked up right after.
        let servers = ResolvedServers::for_rules(&policy.servers, Some(&self.servers));
        // What the daemon goes back to when nothing is written.
        let previous = (
            std::mem::replace(&mut self.fingerprint, policy.fingerprint()),
            std::mem::replace(&mut self.policy, policy),
            std::mem::replace(&mut self.servers, servers),
        );
        let changed = || Stamp::of(&self.config) != self.stamp;
        let result: Result<Option<Option<MapEntries>>> = (|| {
            if self.backend == Backend::Nftables {
                let _lock = self.nftables_lock()?;
                if changed() {
                    return Ok(None);
                }
                // One transaction replaces the table.
                crate::servers::note_replaced_command_list_in_table(&self.scope);
                nftables::apply(&self.scope, &self.policy, &self.servers.endpoints())?;
                return Ok(Some(None));
            }
            let _lock = self.lock()?;
            if changed() {
                return Ok(None);
            }
            crate::servers::note_replaced_command_list(&pins::pin_dir(&self.scope));
            let entries = self.entries()?;
            ebpf::write_policy(&pins::pin_dir(&self.scope), &entries)?;
            Ok(Some(Some(entries)))
        })();
        match result {
            Ok(None) => {
                (self.fingerprint, self.policy, self.servers) = previous;
                tracing::info!(
                    "{} changed while it was read: reading it again",
                    self.config.display()
                );
                None
            }
            Ok(Some(entries)) => {
                self.refused = None;
                tracing::info!(
                    servers = self.servers.endpoints().len(),
                    "reload applied from {}",
                    self.config.display()
                );
                if let Some(entries) = entries {
                    self.log_tunnels(&entries.interfaces.tunnels);
                }
                Some(true)
            }
            Err(e) if self.in_force() == Some(self.fingerprint) => {
                // The scope records the new policy: what failed came after its maps (the
                // guard, whose switch is off now). It is this daemon's; the devices' write is
                // tried again each second until the guard is where the policy wants it.
                self.refused = None;
                self.devices_failed = true;
                tracing::error!("reload written, but not all of it: {e}");
                Some(false)
            }
            Err(e) => {
                (self.fingerprint, self.policy, self.servers) = previous;
                // Not applied: tried again at a later event (after RETRY_AFTER).
                self.stamp = previous_stamp;
                self.refused = Some((Stamp::of(&self.config), self.in_force(), Instant::now()));
                tracing::error!("reload failed, the policy in force stays: {e}");
                Some(false)
            }
        }
    }

    /// Starts a lookup of every name whose records expired (or whose last lookup failed); the
    /// answers come back through `answers`, so a slow resolver never delays a tunnel change.
    fn look_up_due_names(&mut self, answers: &mpsc::UnboundedSender<(String, Result<Lookup>)>) {
        for name in self.servers.take_due(Instant::now()) {
            let answers = answers.clone();
            tokio::spawn(async move {
                let answer = lookup(&name).await;
                let _ = answers.send((name, answer));
            });
        }
    }

    /// A lookup finished: new addresses are added before stale ones are removed; a failed lookup
    /// keeps the last known addresses.
    fn name_answered(&mut self, name: &str, answer: Result<Lookup>) {
        let previous = self.servers.clone();
        self.servers.record(name, &answer);
        let before = previous.keys();
        let after = self.servers.keys();
        let added: BTreeSet<_> = after.difference(&before).copied().collect();
        let removed: BTreeSet<_> = before.difference(&after).copied().collect();
        if added.is_empty() && removed.is_empty() {
            return;
        }
        let result = (|| {
            if self.backend == Backend::Nftables {
                let _lock = self.nftables_lock()?;
                if self.config_changed() {
                    return Ok(Written::ConfigChanged);
                }
                if nftables::servers_set_by_command(&self.scope) {
                    return Ok(Written::Nothing);
                }
                // One transaction: the old and the new addresses are never both missing.
                nftables::apply(&self.scope, &self.policy, &self.servers.endpoints())?;
                return Ok(Written::Changes);
            }
            let _lock = self.lock()?;
            if self.config_changed() {
                return Ok(Written::ConfigChanged);
            }
            let mut maps = self.maps()?;
            if maps.has_server_name(&COMMAND_OWNS_THE_LIST)? {
                // The list is the command's until a reload; the answer waits for that.
                return Ok(Written::Nothing);
            }
            maps.add_servers(&added)?;
            maps.set_server_names(&self.servers.record_of_names())?;
            maps.remove_servers(&removed).map(|_| Written::Changes)
        })();
        match result {
            // The reload writes the list with this answer in it.
            Ok(Written::ConfigChanged) => {
                self.reload_changed_config();
            }
            Ok(Written::Nothing) => tracing::info!(
                host = name,
                "{name} changed, but the server list in force was set with `killswitch \
                 servers`: it stays until a reload"
            ),
            Ok(Written::Changes) => tracing::info!(
                host = name,
                added = added.len(),
                removed = removed.len(),
                "server addresses changed: {name}: {} added, {} removed",
                added.len(),
                removed.len()
            ),
            Err(e) => {
                // Keep what the maps hold; the name is asked again after the retry period.
                self.servers = previous;
                tracing::error!("cannot update the server addresses of {name}: {e}");
            }
        }
    }
}

/// What a name's answer did to the maps.
enum Written {
    Changes,
    /// The `servers` command owns the list.
    Nothing,
    /// The config changed: a reload writes everything instead.
    ConfigChanged,
}

/// An inotify watch on the directory that holds the `[vpn_client]` cgroup: systemd makes a
/// unit's new cgroup there just before it starts the client.
struct ClientWatch {
    path: std::path::PathBuf,
    /// The directory's inode: one removed and made again needs a new watch.
    inode: u64,
    inotify: AsyncFd<Watch>,
}

/// The inotify instance as something tokio can wait on.
struct Watch(nix::sys::inotify::Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        std::os::fd::AsFd::as_fd(&self.0).as_raw_fd()
    }
}

impl ClientWatch {
    fn new(mount: &Path, policy: &Policy) -> Option<ClientWatch> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        use std::os::unix::fs::MetadataExt;
        let path = client_parent(mount, policy)?;
        let inode = std::fs::metadata(&path).ok()?.ino();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        let events = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM;
        if let Err(e) = inotify.add_watch(&path, events) {
            // The 100 ms look covers it.
            tracing::debug!("cannot watch {}: {e}", path.display());
            return None;
        }
        // SAFETY: the inotify fd is owned by the `Watch`, which the AsyncFd owns until dropped.
        let inotify = unsafe { AsyncFd::register(Watch(inotify)) }.ok()?;
        Some(ClientWatch {
            path,
            inode,
            inotify,
        })
    }

    /// Whether this watch still sees `wanted`, the same directory as when it was made.
    fn watches(&self, wanted: Option<&Path>) -> bool {
        use std::os::unix::fs::MetadataExt;
        wanted == Some(self.path.as_path())
            && std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode)
    }
}

/// The directory that holds the configured VPN client cgroup.
fn client_parent(mount: &Path, policy: &Policy) -> Option<std::path::PathBuf> {
    let cgroup = policy.vpn_client.as_ref()?.cgroup.as_ref()?;
    mount.join(cgroup).parent().map(Path::to_path_buf)
}

/// The client watch's readiness; never, without one.
async fn watched(
    watch: &mut Option<ClientWatch>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, Watch>> {
    match watch {
        Some(watch) => watch.inotify.readable().await,
        None => std::future::pending().await,
    }
}

/// The drop events' readiness; never, without a ring buffer.
async fn readable(
    events: &mut Option<AsyncFd<Ring>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, Ring>> {
    match events {
        Some(events) => events.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// A timer that ticks each `period`; one not polled for a while (its branch was off) ticks
/// once, not once for each period missed.
fn every(period: std::time::Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

fn signal_error(e: std::io::Error) -> Error {
    Error::kernel("cannot install the signal handlers", e)
}

/// The ring buffer as something tokio can wait on.
struct Ring(EventReader);

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
