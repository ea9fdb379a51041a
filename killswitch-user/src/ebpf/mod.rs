//! The eBPF backend: load and verify the kernel programs, fill their pinned maps, attach them to
//! a scope's cgroup and pin the links so enforcement outlives every process of ours.

pub mod entries;
pub mod guard;
pub mod kernel;
mod loader;
pub mod maps;
pub mod pins;
mod reuse;
pub mod shapes;
pub mod sys;
pub mod trace;

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender},
    },
};

use aya::{
    maps::ProgramArray,
    programs::{
        cgroup_skb::CgroupSkbAttachType, links::FdLink, CgroupAttachMode, CgroupSkb, ProgramError,
    },
    Ebpf, EbpfLoader,
};
use killswitch_common::{Direction, GUARD_NOT_AN_UPLINK};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};

pub use entries::{InterfaceEntries, MapEntries};
pub use kernel::{NetnsSource, Pair};
pub use maps::PinnedMaps;

use crate::{
    error::{chain, Error, Result},
    scope::Scope,
};

/// The kernel programs, built by build.rs from `killswitch-ebpf`.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/killswitch.bpf.o"));

/// Pin file of a direction's link inside a scope's pin directory.
pub fn link_pin(pin_dir: &Path, direction: Direction) -> PathBuf {
    pin_dir.join(format!("{}_link", direction.name()))
}

/// Whether the scope's pinned links no longer hold a cgroup: the kernel detaches a cgroup's
/// links when the cgroup is released (removed, and its last socket closed). A scope with no
/// link pinned holds nothing.
pub fn links_released(scope: &Scope) -> bool {
    let pin_dir = pins::pin_dir(scope);
    Direction::ALL.iter().all(
        |&direction| match sys::obj_get(&link_pin(&pin_dir, direction)) {
            Ok(link) => sys::cgroup_link_info(&link).is_ok_and(|info| info.cgroup_id == 0),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        },
    )
}

/// Where a new link is pinned before it replaces the old one (bpffs names cannot contain dots).
fn new_link_pin(pin_dir: &Path, direction: Direction) -> PathBuf {
    pin_dir.join(format!("{}_link_new", direction.name()))
}

fn attach_type(direction: Direction) -> CgroupSkbAttachType {
    match direction {
        Direction::Egress => CgroupSkbAttachType::Egress,
        Direction::Ingress => CgroupSkbAttachType::Ingress,
    }
}

/// Both programs loaded and verified, their maps pinned in one directory (reused if present
/// and of the shape this build needs; see [`shapes`]).
pub struct Programs {
    ebpf: Ebpf,
    pair: Pair,
    /// Where the maps of these programs are pinned until they are attached: the scope's pin
    /// directory, or its staging directory when a pinned map had another shape.
    map_dir: PathBuf,
}

impl Programs {
    /// Loads the policy pair that suits the running kernel.
    pub fn load(pin_dir: &Path) -> Result<Programs> {
        Programs::load_policy(pin_dir, None)
    }

    /// Loads the policy pair and writes `entries` into its maps. Maps that no program in force
    /// uses yet (a new scope, or a new set for an upgrade) are filled while the verifier works;
    /// maps in use are written only once every program passed it, so that a refusal changes
    /// nothing.
    pub fn load_filled(pin_dir: &Path, entries: &MapEntries) -> Result<Programs> {
        Programs::load_policy(pin_dir, Some(entries))
    }

    fn load_policy(pin_dir: &Path, fill: Option<&MapEntries>) -> Result<Programs> {
        let _signals = SignalsHeld::new();
        let (loader, netns, prepared, filled) = match warmed(fill) {
            Some((
                Warm {
                    loader,
                    netns,
                    prepared,
                },
                filled,
            )) => (loader, netns, prepared, filled),
            None => (None, kernel::netns_source(), None, false),
        };
        let netns = netns.map_err(|reason| {
            Error::kernel("this kernel cannot run the killswitch programs", reason)
        })?;
        let pair = Pair::Policy(netns);
        // Prepared with this same probe's answer: of this pair.
        if let Some(prepared) = prepared {
            match prepared.adopt(pin_dir) {
                Ok(programs) => {
                    if let Some(entries) = fill.filter(|_| !filled) {
                        PinnedMaps::open(pin_dir)?.write(entries)?;
                    }
                    return Ok(programs);
                }
                Err(e) => tracing::debug!("the programs verified ahead are not used: {e}"),
            }
        }
        let loader = loader.unwrap_or_else(EbpfLoader::new);
        Programs::load_with(loader, pin_dir, pair, fill, LOG_OFF, None)
    }

    /// Loads one pair of the object and, with `fill`, writes it into the maps (the tests load
    /// both policy pairs where the kernel can).
    pub fn load_pair(pin_dir: &Path, pair: Pair, fill: Option<&MapEntries>) -> Result<Programs> {
        Programs::load_with(EbpfLoader::new(), pin_dir, pair, fill, LOG_OFF, None)
    }

    /// Loads `pair` on the scope's pinned maps with every verdict logged through aya-log, for
    /// `trace` to swap in (see [`trace`](crate::trace)).
    pub fn load_traced(pin_dir: &Path, pair: Pair) -> Result<Programs> {
        Programs::load_with(EbpfLoader::new(), pin_dir, pair, None, LOG_INFO, None)
    }

    /// `maps_made` hears where the maps are as soon as they are, before the verifier's work.
    fn load_with(
        loader: EbpfLoader<'static>,
        pin_dir: &Path,
        pair: Pair,
        fill: Option<&MapEntries>,
        log_level: u8,
        maps_made: Option<&SyncSender<PathBuf>>,
    ) -> Result<Programs> {
        // The verifier gives up with EAGAIN when a signal is pending for this thread; keep
        // signals for after the load (they are delivered when the mask is restored).
        let _signals = SignalsHeld::new();
        // Pinned maps are reused by name: only ones that root made and only root can change.
        pins::check_pinned(pin_dir)?;
        if let Ok(entries) = std::fs::read_dir(pin_dir) {
            for entry in entries.flatten() {
                pins::check_pinned(&entry.path())?;
            }
        }
        let in_use = pin_dir.join(maps::SETTINGS).exists();
        let map_dir = map_dir(pin_dir)?;
        let offsets;
        // Borrows below live only as long as this load.
        let mut loader: EbpfLoader<'_> = loader;
        loader.default_map_pin_directory(&map_dir);
        // A constant in frozen read-only data: with it off, the verifier drops the logging.
        loader.override_global("AYA_LOG_LEVEL", &log_level, true);
        if let Pair::Policy(NetnsSource::Socket {
            sock_net_offset,
            net_cookie_offset,
        }) = pair
        {
            offsets = [sock_net_offset, net_cookie_offset];
            loader
                .override_global("SOCK_NET_OFFSET", &offsets[0], true)
                .override_global("NET_COOKIE_OFFSET", &offsets[1], true);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| Error::kernel("the kernel refused the killswitch maps", chain(&e)))?;
        if let Some(made) = maps_made {
            let _ = made.send(map_dir.clone());
        }
        // Maps no attached program reads may be written before the verifier has said yes.
        let fill_while_verifying = fill.filter(|_| !in_use || map_dir != pin_dir);
        // The verifier's work is most of a load: every program at once, one thread each (a new
        // thread inherits the blocked signals), and new maps filled meanwhile.
        let icmp_error = pair.icmp_error_program();
        let mut wanted: Vec<(&str, &mut CgroupSkb)> = ebpf
            .programs_mut()
            .filter(|(name, _)| {
                Direction::ALL
                    .iter()
                    .any(|&d| pair.program_name(d) == *name)
                    || icmp_error.is_some_and(|(icmp, _)| icmp == *name)
            })
            .filter_map(|(name, program)| Some((name, <&mut CgroupSkb>::try_from(program).ok()?)))
            .collect();
        if wanted.len() != Direction::ALL.len() + usize::from(icmp_error.is_some()) {
            return Err(Error::kernel(
                "broken eBPF object",
                "a cgroup_skb program is missing",
            ));
        }
        let map_dir_ref = &map_dir;
        let mut jobs: Vec<Job<'_>> = wanted
            .iter_mut()
            .map(|(name, program)| Box::new(move || load_program(program, name)) as Job<'_>)
            .collect();
        if let Some(entries) = fill_while_verifying {
            jobs.push(Box::new(move || {
                PinnedMaps::open(map_dir_ref)?.write(entries)
            }));
        }
        all_at_once(jobs)?;
        if let Some((name, slot)) = icmp_error {
            set_icmp_error_program(&mut ebpf, name, slot)?;
        }
        if let (Some(entries), None) = (fill, fill_while_verifying) {
            PinnedMaps::open(&map_dir)?.write(entries)?;
        }
        Ok(Programs {
            ebpf,
            pair,
            map_dir,
        })
    }

    pub fn pair(&self) -> Pair {
        self.pair
    }

    /// Starts reading these programs' aya-log records into `logger` (a traced copy's; the
    /// enforcing programs write none).
    pub fn log_reader<L: log::Log>(&mut self, logger: L) -> Result<aya_log::EbpfLogger<L>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|e| Error::kernel("cannot read the traced programs' records", chain(&e)))
    }

    /// Where to write these programs' maps before they are attached.
    pub fn map_dir(&self) -> &Path {
        &self.map_dir
    }

    /// How these programs learn a packet's network namespace (none in lockdown).
    pub fn netns(&self) -> Option<NetnsSource> {
        match self.pair {
            Pair::Policy(netns) => Some(netns),
            Pair::Lockdown => None,
        }
    }

    /// The loaded (not attached) program, e.g. for BPF_PROG_TEST_RUN.
    pub fn program(&self, direction: Direction) -> &CgroupSkb {
        self.ebpf
            .program(self.pair.program_name(direction))
            .and_then(|p| <&CgroupSkb>::try_from(p).ok())
            .expect("the object defines every cgroup_skb program")
    }

    /// The loaded ICMP-error program the ingress program tail-calls (none in lockdown).
    pub fn icmp_error_program(&self) -> Option<&CgroupSkb> {
        let (name, _) = self.pair.icmp_error_program()?;
        self.ebpf
            .program(name)
            .and_then(|p| <&CgroupSkb>::try_from(p).ok())
    }

    /// Attaches both programs next to whatever is attached (multi-attach: any drop wins), then
    /// moves each new link's pin over the old one, which detaches the old link. At every moment
    /// at least one complete program per direction is attached.
    fn attach_and_pin(&mut self, cgroup: &File, pin_dir: &Path) -> Result<()> {
        for direction in Direction::ALL {
            let program = program_mut(&mut self.ebpf, self.pair.program_name(direction))?;
            // A cgroup bpf_link always runs next to other links; the kernel rejects
            // BPF_F_ALLOW_MULTI in link_create flags, so the mode must be the flag-less one.
            let id = program
                .attach(cgroup, attach_type(direction), CgroupAttachMode::Single)
                .map_err(|e| Error::kernel("cannot attach to the cgroup", chain(&e)))?;
            let link = program
                .take_link(id)
                .map_err(|e| Error::kernel("cannot take the link", chain(&e)))?;
            let link = FdLink::try_from(link)
                .map_err(|e| Error::kernel("the kernel gave no bpf_link", chain(&e)))?;
            let final_pin = link_pin(pin_dir, direction);
            let new_pin = new_link_pin(pin_dir, direction);
            remove_if_present(&new_pin)?;
            link.pin(&new_pin)
                .map_err(|e| Error::kernel("cannot pin the link", chain(&e)))?;
            std::fs::rename(&new_pin, &final_pin)
                .map_err(|e| Error::io("cannot replace the pinned link", &final_pin, e))?;
        }
        // The old programs are gone: their maps may be replaced by the staged ones.
        if self.map_dir != pin_dir {
            shapes::promote(pin_dir)?;
            self.map_dir = pin_dir.to_path_buf();
        }
        Ok(())
    }
}

/// aya-log's levels (`aya_log_common::Level`): the programs that enforce log nothing; a
/// traced copy logs each verdict at info.
pub(crate) const LOG_OFF: u8 = 0;
const LOG_INFO: u8 = 3;

/// What a load needs that takes a while and no lock: the kernel's BTF (aya parses it in
/// `EbpfLoader::new`) and the probe for the namespace source; for a cold `up`, the programs
/// themselves.
struct Warm {
    loader: Option<EbpfLoader<'static>>,
    netns: std::result::Result<NetnsSource, String>,
    prepared: Option<Prepared>,
}

/// The thread working on [`Warm`], and where it says that the maps of its programs are made.
struct WarmingThread {
    handle: std::thread::JoinHandle<Warm>,
    maps_made: Receiver<PathBuf>,
}

static WARMING: std::sync::Mutex<Option<WarmingThread>> = std::sync::Mutex::new(None);

/// Starts the slow, lock-free part of the next policy load on a thread, so that it runs while
/// the caller reads its config (about 15 ms of a cold `up`).
pub fn warm_up() {
    start_warming(false);
}

/// [`warm_up`] for an `up` of `scope`: when nothing enforces it yet, the programs are loaded
/// and verified too, on maps of their own, while the config is read (the verifier is most of a
/// cold `up`). What the load does not use is removed when the returned value is dropped.
pub fn warm_up_for(scope: &Scope) -> Warming {
    start_warming(!is_pinned(scope) && pins::bpffs_mounted());
    Warming
}

fn start_warming(cold: bool) {
    let (made, maps_made) = std::sync::mpsc::sync_channel(1);
    // Without a thread the load simply does this itself.
    let started = std::thread::Builder::new().spawn(move || {
        let netns = kernel::netns_source();
        match (cold, &netns) {
            (true, Ok(source)) => Warm {
                loader: None,
                prepared: prepare(*source, &made)
                    .map_err(|e| tracing::debug!("no programs verified ahead: {e}"))
                    .ok(),
                netns,
            },
            _ => Warm {
                loader: Some(EbpfLoader::new()),
                netns,
                prepared: None,
            },
        }
    });
    *WARMING.lock().unwrap_or_else(|e| e.into_inner()) = started
        .ok()
        .map(|handle| WarmingThread { handle, maps_made });
}

/// Drops what [`warm_up_for`] prepared and no load took (its maps' private directory too).
pub struct Warming;

impl Drop for Warming {
    fn drop(&mut self) {
        let thread = WARMING.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(thread.map(|t| t.handle.join()));
    }
}

/// The policy programs of a cold `up`, loaded and verified before the policy is known, on new
/// maps pinned in a private directory of the pin root. The scope's first load adopts them when
/// it has no maps pinned yet; anything else drops them, directory and all.
struct Prepared {
    programs: Programs,
    dir: pins::PrivateDir,
}

fn prepare(netns: NetnsSource, maps_made: &SyncSender<PathBuf>) -> Result<Prepared> {
    let _signals = SignalsHeld::new();
    // Made (or repaired) only by the main thread, under its checks: here it must exist.
    let dir = pins::PrivateDir::make("load")?;
    let programs = Programs::load_with(
        loader::without_kernel_btf(dir.path())?,
        dir.path(),
        Pair::Policy(netns),
        None,
        LOG_OFF,
        Some(maps_made),
    )?;
    Ok(Prepared { programs, dir })
}

impl Prepared {
    /// Moves the maps into `pin_dir`, which must hold none of them (nothing to reuse there).
    fn adopt(self, pin_dir: &Path) -> Result<Programs> {
        let Prepared { mut programs, dir } = self;
        pins::check_pinned(pin_dir)?;
        if let Some(name) = shapes::expected()
            .keys()
            .find(|name| std::fs::symlink_metadata(pin_dir.join(name)).is_ok())
        {
            return Err(Error::Runtime(format!("{name} is pinned already")));
        }
        shapes::remove_staging(pin_dir)?;
        for name in shapes::expected().keys() {
            let from = dir.path().join(name);
            std::fs::rename(&from, pin_dir.join(name))
                .map_err(|e| Error::io("cannot move the new map into place", &from, e))?;
        }
        programs.map_dir = pin_dir.to_path_buf();
        Ok(programs)
    }
}

/// What [`warm_up`] prepared; a failed probe is not kept (it may have been transient, and a
/// daemon may load long after it started).
fn warmed(fill: Option<&MapEntries>) -> Option<(Warm, bool)> {
    let thread = WARMING.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    // Programs prepared ahead have their maps before the verifier is done: with `fill`, they are
    // filled meanwhile. Whether they were is the second value.
    let filled = match (fill, thread.maps_made.recv()) {
        (Some(entries), Ok(dir)) => PinnedMaps::open(&dir)
            .and_then(|mut maps| maps.fill_new(entries))
            .map_err(|e| tracing::debug!("the maps prepared ahead are not filled: {e}"))
            .is_ok(),
        _ => false,
    };
    let warm = thread
        .handle
        .join()
        .ok()
        .filter(|warm| warm.netns.is_ok())?;
    Some((warm, filled))
}

/// Where a load pins its maps: the scope's directory, or a fresh staging directory when a map
/// pinned there has another shape (left by another version; never reused, see [`shapes`]).
fn map_dir(pin_dir: &Path) -> Result<PathBuf> {
    if shapes::stale(pin_dir)?.is_empty() {
        shapes::remove_staging(pin_dir)?;
        return Ok(pin_dir.to_path_buf());
    }
    tracing::warn!(
        "the maps of {} are replaced (another version made them); counters start again and a \
         daemon started before this must be restarted",
        pin_dir.display()
    );
    shapes::stage(pin_dir)
}

/// Puts the loaded ICMP-error program `name` in its `ICMP_ERRORS` slot, where the pair's
/// ingress program tail-calls it.
fn set_icmp_error_program(ebpf: &mut Ebpf, name: &str, slot: u32) -> Result<()> {
    let program = program_mut(ebpf, name)?
        .fd()
        .map_err(|e| Error::kernel("the ICMP-error program has no fd", chain(&e)))?
        .try_clone()
        .map_err(|e| Error::kernel("cannot duplicate a program fd", e))?;
    let map = ebpf
        .map_mut(maps::ICMP_ERRORS)
        .ok_or_else(|| Error::kernel("broken eBPF object", "the ICMP_ERRORS map is missing"))?;
    ProgramArray::try_from(map)
        .and_then(|mut slots| slots.set(slot, &program, 0))
        .map_err(|e| Error::kernel("cannot set the ICMP-error program", chain(&e)))
}

/// Work of one program load that can run beside the rest.
type Job<'a> = Box<dyn FnOnce() -> Result<()> + Send + 'a>;

/// Runs `jobs` on threads of their own, each inline instead when no thread can be had (a
/// boot with its task limit reached must still end enforced or in lockdown, never crash).
/// Every job runs; the first error wins; a job that panicked is an error too.
fn all_at_once(jobs: Vec<Job<'_>>) -> Result<()> {
    let slots: Vec<std::sync::Mutex<Option<Job<'_>>>> = jobs
        .into_iter()
        .map(|job| std::sync::Mutex::new(Some(job)))
        .collect();
    let run = |slot: &std::sync::Mutex<Option<Job<'_>>>| {
        let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        job.map_or(Ok(()), |job| job())
    };
    std::thread::scope(|threads| {
        let results: Vec<Result<()>> = slots
            .iter()
            .map(|slot| {
                std::thread::Builder::new()
                    .spawn_scoped(threads, || run(slot))
                    // No thread: the job is still in its slot.
                    .map_err(|_| run(slot))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|started| match started {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(Error::Runtime(
                        "a thread loading the programs panicked".into(),
                    ))
                }),
                Err(inline) => inline,
            })
            .collect();
        results.into_iter().collect()
    })
}

/// How often a load interrupted by a signal (EAGAIN) is tried again, as libbpf does.
const LOAD_ATTEMPTS: u32 = 5;

/// Loads one program, trying again a bounded number of times when the verifier was interrupted.
fn load_program(program: &mut CgroupSkb, name: &str) -> Result<()> {
    load_with_retries(name, || program.load())
}

/// Runs `load` for the program `name`, again a bounded number of times when the verifier was
/// interrupted (EAGAIN); a refusal is one line with the verifier's reason.
fn load_with_retries(
    name: &str,
    mut load: impl FnMut() -> std::result::Result<(), ProgramError>,
) -> Result<()> {
    let mut attempt = 1;
    loop {
        match load() {
            Ok(()) => return Ok(()),
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                LOAD_RETRIES.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "loading the {name} program was interrupted (EAGAIN); attempt {} of {LOAD_ATTEMPTS}",
                    attempt + 1
                );
                attempt += 1;
            }
            Err(ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => {
                let log = verifier_log.to_string();
                tracing::debug!("the verifier on the {name} program:\n{log}");
                return Err(Error::kernel(
                    format!("the kernel refused the {name} program"),
                    format!("{io_error}; the verifier said: {}", verifier_verdict(&log)),
                ));
            }
            Err(e) => {
                return Err(Error::kernel(
                    format!("the kernel refused the {name} program"),
                    chain(&e),
                ))
            }
        }
    }
}

/// The line of a verifier log that says why it refused (its last lines are statistics).
fn verifier_verdict(log: &str) -> &str {
    log.lines()
        .rev()
        .map(str::trim)
        .find(|line| {
            !line.is_empty()
                && !line.starts_with("verification time")
                && !line.starts_with("stack depth")
                && !line.starts_with("processed ")
        })
        .unwrap_or("nothing (run with -v for its log)")
}

/// Loads tried again after EAGAIN since the process started (the tests and the bench report it).
pub static LOAD_RETRIES: AtomicU64 = AtomicU64::new(0);

/// Blocks every blockable signal on this thread until dropped; pending ones arrive then.
pub(crate) struct SignalsHeld(Option<SigSet>);

impl SignalsHeld {
    pub(crate) fn new() -> Self {
        let mut old = SigSet::empty();
        let held = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old));
        SignalsHeld(held.ok().map(|()| old))
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(old), None);
        }
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSkb> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut CgroupSkb>::try_from(p).ok())
        .ok_or_else(|| Error::kernel("broken eBPF object", "a cgroup_skb program is missing"))
}

/// Whether the scope has pinned links (it was brought `up` and not taken `down`).
/// Whether the scope runs the programs this version's `up` attached and recorded (not a
/// `trace` copy, another version's or lockdown); for `status`, without the lock.
pub fn runs_what_up_attached(scope: &Scope) -> bool {
    reuse::attached_are_ours(scope, &pins::pin_dir(scope))
}

pub fn is_pinned(scope: &Scope) -> bool {
    Direction::ALL
        .iter()
        .any(|&d| link_pin(&pins::pin_dir(scope), d).exists())
}

/// Applies the entries `build` makes to the scope: first time, load + fill + attach + pin;
/// again, update the pinned maps in place (or fill a new set when their shape changed, see
/// [`shapes`]) and swap in freshly loaded programs without a gap. `build` runs under the scope's lock (it lists the interfaces: a daemon racing us must
/// not be overwritten with an older list). A first apply that fails leaves the scope in
/// lockdown (`Error::Lockdown`), never open. Returns what was written.
pub fn apply(scope: &Scope, build: impl FnOnce() -> Result<MapEntries>) -> Result<MapEntries> {
    apply_with(scope, build, true)
}

/// [`apply`]; without `lockdown`, a scope nothing enforced yet is left as it was when the apply
/// fails: for `--backend auto`, which tries nftables next (and locks down if that fails too).
pub fn apply_with(
    scope: &Scope,
    build: impl FnOnce() -> Result<MapEntries>,
    lockdown: bool,
) -> Result<MapEntries> {
    pins::ensure_bpffs()?;
    let cgroup = open_cgroup(scope)?;
    let _lock = pins::ScopeLock::acquire(scope)?;
    let fresh = !is_pinned(scope);
    let pin_dir = pins::pin_dir(scope);
    let result = (|| {
        let entries = build()?;
        // Other namespaces pass the cgroup programs only once the guard holds the uplinks.
        let guard_runs = !fresh
            && PinnedMaps::open(&pin_dir)
                .and_then(|maps| maps.settings())
                .is_ok_and(|settings| settings.guard != 0);
        let mut staged = entries.clone();
        staged.settings.guard &= u32::from(guard_runs);
        // This build's programs already attached (an `up` of this boot recorded them): the
        // maps are the whole update, written without a moment wider than old or new.
        if !fresh && reuse::attached_are_ours(scope, &pin_dir) {
            match PinnedMaps::open(&pin_dir).and_then(|mut maps| maps.write(&staged)) {
                Ok(()) => {
                    guard_then_switch(&pin_dir, &entries)?;
                    return Ok(entries);
                }
                // The old policy is back in force (or the maps would not open): load afresh.
                Err(e) => tracing::info!("writing the maps alone failed ({e}); loading again"),
            }
        }
        reuse::forget(&pin_dir);
        // Both programs verified before anything a running scope depends on changes.
        let mut programs = Programs::load_filled(&pin_dir, &staged)?;
        // The guard first: no moment with the host held and its containers not.
        run_guard(programs.map_dir(), &pin_dir, &entries, true)?;
        programs.attach_and_pin(&cgroup, &pin_dir)?;
        maps::set_lockdown_reason(&pin_dir, "")?;
        reuse::record(scope, &pin_dir, programs.pair());
        if entries.settings.guard != staged.settings.guard {
            PinnedMaps::open(&pin_dir)?.set_guard(true)?;
        }
        Ok(entries)
    })();
    match result {
        // Nothing enforced this scope before: never leave it open.
        Err(cause) if fresh && lockdown => Err(held_in_lockdown(&cgroup, scope, cause)),
        Err(cause) if fresh => {
            // Nothing of ours is attached: the empty pin directory goes too.
            let _ = remove_pins(&pins::pin_dir(scope));
            Err(cause)
        }
        // Already enforced: what is in force stays untouched.
        other => other,
    }
}

/// Writes `entries` into the maps in force as [`apply`] does when the programs stay: the
/// other-namespace switch no wider than it is now while the maps change, then the guard where
/// `entries` wants it, then the switch (for the daemon's reload).
pub fn write_policy(pin_dir: &Path, entries: &MapEntries) -> Result<()> {
    let mut maps = PinnedMaps::open(pin_dir)?;
    let mut staged = entries.clone();
    staged.settings.guard &= maps.settings()?.guard;
    maps.write(&staged)?;
    guard_then_switch(pin_dir, entries)
}

/// The guard where `entries` wants it, then the other-namespace switch on if the policy has a
/// guard; any failure leaves the switch off.
fn guard_then_switch(pin_dir: &Path, entries: &MapEntries) -> Result<()> {
    let result = run_guard(pin_dir, pin_dir, entries, false).and_then(|()| {
        if entries.settings.guard != 0 {
            PinnedMaps::open(pin_dir)?.set_guard(true)?;
        }
        Ok(())
    });
    if result.is_err() {
        switch_off(pin_dir);
    }
    result
}

/// Other namespaces stop passing the cgroup programs (best effort: on an error path). Only under
/// the scope's lock: it rewrites the whole settings entry from what it reads.
pub fn switch_off(pin_dir: &Path) {
    if let Ok(mut maps) = PinnedMaps::open(pin_dir) {
        let _ = maps.set_guard(false);
    }
}

/// Puts the uplink guard where `entries` wants it: with the guard on, its programs loaded
/// (again when `reload`, or when none are pinned yet) on the maps in `map_dir` and attached to
/// exactly `entries.interfaces.guarded`; with it off, none. The switch that lets other namespaces past
/// the cgroup programs is the caller's, once this is done.
fn run_guard(map_dir: &Path, pin_dir: &Path, entries: &MapEntries, reload: bool) -> Result<()> {
    if entries.settings.guard == 0 {
        // The programs in force may still read the maps in `pin_dir` (a new set is staged).
        switch_off(pin_dir);
        return guard::remove(pin_dir);
    }
    let attached = (|| {
        if reload || !guard::loaded(pin_dir) {
            guard::load(map_dir, pin_dir)?;
        }
        guard::attach(pin_dir, &entries.interfaces.guarded)
    })();
    // Nothing may leave by a device without its guard: other namespaces stop passing.
    if attached.is_err() {
        switch_off(pin_dir);
    }
    attached
}

/// The daemon's attach after a link event: the guard on exactly `guarded`, and other
/// namespaces passing the cgroup programs only while that holds for every device.
pub fn guard_uplinks(pin_dir: &Path, guarded: &guard::Guarded) -> Result<()> {
    let attached = guard::attach(pin_dir, guarded);
    let switched = PinnedMaps::open(pin_dir).and_then(|mut maps| maps.set_guard(attached.is_ok()));
    attached.and(switched)
}

/// While a policy the daemon did not read is in force and it cannot write its own: every
/// wired device without a guard in the map (a new uplink, which would carry a VM's frames
/// unjudged) gets one that passes nothing, until a policy is written again. Only adds: the
/// devices the map names get their guard again (one a rename or a failure left without it),
/// no guard is taken away and no entry of the map changed but gone devices'. Nothing when the
/// policy in force has no guard. The caller holds the scope's lock.
pub fn guard_unknown_devices(pin_dir: &Path, netns_cookie: u64) -> Result<()> {
    if !guard::loaded(pin_dir) {
        return Ok(());
    }
    let mut maps = PinnedMaps::open(pin_dir)?;
    let list = crate::interfaces::list()?;
    // Without the tunnels a tunnel that looks wired (PPP) would lose its traffic: tried again.
    let tunnels = maps.tunnels()?;
    let tunnel = |i: &crate::interfaces::Interface| {
        tunnels.contains(&killswitch_common::InterfaceKey::new(netns_cookie, i.index))
    };
    // A map that cannot be read: every wired device gets a guard, and the map is left alone
    // (a device it does not name passes nothing all the same).
    let in_map = maps.guarded().ok();
    let named = |i: &crate::interfaces::Interface| {
        in_map.as_ref().is_some_and(|m| m.contains_key(&i.index))
    };
    // Named from the list: the map keeps no names, and a clsact filter is attached by name.
    let guarded: guard::Guarded = list
        .iter()
        .filter(|i| named(i) || (crate::interfaces::wired(i) && !tunnel(i)))
        .map(|i| (i.index, (i.name.clone(), GUARD_NOT_AN_UPLINK)))
        .collect();
    let new: guard::Guarded = guarded
        .iter()
        .filter(|(index, _)| in_map.as_ref().is_none_or(|m| !m.contains_key(index)))
        .map(|(index, entry)| (*index, entry.clone()))
        .collect();
    if !new.is_empty() {
        let names: Vec<&str> = new.values().map(|(name, _)| name.as_str()).collect();
        tracing::warn!(
            "no policy this daemon knows is in force: {} get a guard that passes nothing",
            names.join(", ")
        );
    }
    let attached = guard::attach_also(pin_dir, &guarded);
    let Some(in_map) = in_map else {
        return attached;
    };
    // The entries only show the new devices in `status`; gone devices' go first, so the map
    // never fills, and no entry there is overwritten.
    let stale: Vec<u32> = in_map
        .keys()
        .filter(|i| !list.iter().any(|d| d.index == **i))
        .copied()
        .collect();
    let listed = maps
        .remove_guarded(&stale)
        .and_then(|()| maps.add_guarded(&new));
    attached.and(listed)
}

/// Holds a scope that is not enforced yet in lockdown because the policy cannot be applied
/// (`cause`: a config the daemon or `up` cannot use, a kernel that refuses the programs).
/// Returns the error to report: `Error::Lockdown(cause)`, or `cause` itself when the scope is
/// already enforced (then nothing is touched).
pub fn lock_down(scope: &Scope, cause: Error) -> Error {
    match try_lock_down(scope, cause) {
        Ok(report) => report,
        Err(failed) => {
            let (cause, also) = *failed;
            not_enforced(scope, cause, also)
        }
    }
}

/// [`lock_down`] that hands `cause` back with the reason when the kernel refuses the lockdown
/// programs too, so that another backend can try.
pub fn try_lock_down(scope: &Scope, cause: Error) -> Result<Error, Box<(Error, Error)>> {
    let prepared = pins::ensure_bpffs().and_then(|()| open_cgroup(scope));
    let cgroup = match prepared {
        Ok(cgroup) => cgroup,
        Err(also) => return Err(Box::new((cause, also))),
    };
    let _lock = match pins::ScopeLock::acquire(scope) {
        Ok(lock) => lock,
        Err(also) => return Err(Box::new((cause, also))),
    };
    if is_pinned(scope) {
        return Ok(cause);
    }
    let held = (|| {
        let mut programs = Programs::load_pair(&pins::pin_dir(scope), Pair::Lockdown, None)?;
        maps::set_lockdown_reason(programs.map_dir(), &cause.to_string())?;
        programs.attach_and_pin(&cgroup, &pins::pin_dir(scope))
    })();
    match held {
        Ok(()) => Ok(Error::Lockdown(Box::new(cause))),
        Err(also) => {
            // Whatever did get attached stays (stricter than nothing); nothing did: no pins.
            if !is_pinned(scope) {
                let _ = remove_pins(&pins::pin_dir(scope));
            }
            Err(Box::new((cause, also)))
        }
    }
}

fn held_in_lockdown(cgroup: &File, scope: &Scope, cause: Error) -> Error {
    let held = (|| {
        let mut programs = Programs::load_pair(&pins::pin_dir(scope), Pair::Lockdown, None)?;
        maps::set_lockdown_reason(programs.map_dir(), &cause.to_string())?;
        programs.attach_and_pin(cgroup, &pins::pin_dir(scope))
    })();
    match held {
        Ok(()) => Error::Lockdown(Box::new(cause)),
        // Whatever did get attached stays: stricter than nothing.
        Err(also) => not_enforced(scope, cause, also),
    }
}

fn not_enforced(scope: &Scope, cause: Error, also: Error) -> Error {
    Error::kernel(
        cause.to_string(),
        format!(
            "lockdown failed too ({also}); {} may be NOT ENFORCED: see `killswitch status`",
            scope.display_cgroup()
        ),
    )
}

fn open_cgroup(scope: &Scope) -> Result<File> {
    File::open(&scope.cgroup).map_err(|e| {
        Error::Usage(format!(
            "--cgroup {}: no such cgroup ({e})",
            scope.cgroup.display()
        ))
    })
}

/// "policy" or "lockdown": what the programs attached to the scope enforce, from their names
/// in the kernel (`None` when nothing of ours is attached).
pub fn mode(scope: &Scope) -> Option<&'static str> {
    let names = program_names();
    let attached: Vec<&str> = Direction::ALL
        .iter()
        .filter_map(|&d| {
            let link = sys::obj_get(&link_pin(&pins::pin_dir(scope), d)).ok()?;
            let info = sys::cgroup_link_info(&link).ok()?;
            names.get(&info.program_id).map(String::as_str)
        })
        .collect();
    mode_of(&attached)
}

/// "policy" or "lockdown" for the names of the attached programs; either direction in
/// lockdown means the policy is not what is enforced.
pub fn mode_of(programs: &[&str]) -> Option<&'static str> {
    let modes: Vec<&'static str> = programs
        .iter()
        .filter_map(|name| Pair::of_program_name(name))
        .collect();
    if modes.contains(&"lockdown") {
        Some("lockdown")
    } else {
        modes.first().copied()
    }
}

/// Names of the loaded BPF programs by id (the kernel keeps each program's name).
pub fn program_names() -> std::collections::HashMap<u32, String> {
    aya::programs::loaded_programs()
        .filter_map(|info| info.ok())
        .filter_map(|info| Some((info.id(), info.name_as_str()?.to_owned())))
        .collect()
}

/// Removes the scope's enforcement. Returns false when there was nothing to remove.
pub fn remove(scope: &Scope) -> Result<bool> {
    let Some(_lock) = pins::ScopeLock::existing(scope)? else {
        return Ok(false);
    };
    reuse::forget(&pins::pin_dir(scope));
    // Other namespaces stop passing before the guard goes.
    switch_off(&pins::pin_dir(scope));
    remove_pins(&pins::pin_dir(scope))?;
    Ok(true)
}

fn remove_pins(pin_dir: &Path) -> Result<()> {
    guard::remove(pin_dir)?;
    for direction in Direction::ALL {
        for pin in [
            link_pin(pin_dir, direction),
            new_link_pin(pin_dir, direction),
        ] {
            if let Ok(link) = sys::obj_get(&pin) {
                // Detach explicitly: a stray fd held elsewhere must not keep the program attached.
                sys::link_detach(&link).map_err(|e| Error::kernel("cannot detach the link", e))?;
            }
            remove_if_present(&pin)?;
        }
    }
    shapes::remove_staging(pin_dir)?;
    for name in maps::ALL {
        remove_if_present(&pin_dir.join(name))?;
    }
    match std::fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("cannot remove", pin_dir, e))
        }
        _ => Ok(()),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("cannot remove", path, e))
        }
        _ => Ok(()),
    }
}
