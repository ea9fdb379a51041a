//! `run --vpn-client`: the cgroup made for the VPN client is recorded (with its id, so a later
//! cgroup at the same path is not the client) and added at once to every enforced scope above
//! it that holds the servers to its VPN client; at the end it is taken out again.

use std::path::Path;

use crate::{
    backend::nftables,
    ebpf::{self, pins, pins::ScopeLock, PinnedMaps},
    error::{Error, Result},
    scope::Scope,
    vpn_client::{self, ClientCgroup},
};

/// Registers the client's cgroup and adds it to the scopes above it, before the client starts.
pub fn register(mount: &Path, scope: &Scope, enforced: &[Scope]) -> Result<()> {
    let path = scope.relative.to_string_lossy().into_owned();
    let client = ClientCgroup::find(mount, &path)
        .ok_or_else(|| Error::Runtime(format!("the cgroup {path} vanished")))?;
    vpn_client::register(&client)?;
    let mut restricting = 0;
    for above in above(&scope.relative, enforced) {
        let added = if ebpf::is_pinned(above) {
            add_to_maps(above, &client)?
        } else {
            nftables::add_vpn_client(above, &client, &nftables::lock(above)?)?
        };
        if added {
            tracing::info!(
                "{} trusts {path} as its VPN client (cgroup id {})",
                above.display_cgroup(),
                client.id
            );
            restricting += 1;
        }
    }
    if restricting == 0 {
        tracing::warn!(
            "no enforced scope above {path} has [vpn_client] in its config: every program \
             there may reach the servers, not just this one"
        );
    }
    Ok(())
}

/// Forgets the client: the registry entry, and its id in the eBPF scopes above it (an nft
/// rule names a cgroup that is gone; the next apply drops it).
pub fn unregister(scope: &Scope, enforced: &[Scope]) {
    let path = scope.relative.to_string_lossy().into_owned();
    vpn_client::unregister(&path);
    let Ok(id) = scope.cgroup_id() else {
        return;
    };
    for above in above(&scope.relative, enforced) {
        if !ebpf::is_pinned(above) {
            continue;
        }
        let removed = ScopeLock::existing(above).and_then(|lock| {
            let Some(_lock) = lock else { return Ok(()) };
            let mut maps = PinnedMaps::open(&pins::pin_dir(above))?;
            let mut entries = maps.entries()?;
            if entries.vpn_clients.remove(&id) {
                maps.write_vpn_clients(&entries)?;
            }
            Ok(())
        });
        if let Err(e) = removed {
            tracing::warn!(
                "cannot forget the VPN client in {}: {e}",
                above.display_cgroup()
            );
        }
    }
}

/// Adds the client to an eBPF scope that holds the servers to its VPN client.
fn add_to_maps(scope: &Scope, client: &ClientCgroup) -> Result<bool> {
    let Some(_lock) = ScopeLock::existing(scope)? else {
        return Ok(false);
    };
    let mut maps = PinnedMaps::open(&pins::pin_dir(scope))?;
    let mut entries = maps.entries()?;
    if entries.settings.vpn_client == 0 {
        return Ok(false);
    }
    entries.vpn_clients.insert(client.id);
    entries.settings.vpn_client_levels |= 1 << client.level;
    maps.write_vpn_clients(&entries)?;
    Ok(true)
}

/// The enforced scopes whose cgroup is `relative` or one above it: the ones whose programs
/// (or table) judge its sockets.
fn above<'a>(relative: &'a Path, enforced: &'a [Scope]) -> impl Iterator<Item = &'a Scope> {
    enforced
        .iter()
        .filter(move |s| relative.starts_with(&s.relative))
}
