//! The few bpf(2) commands aya 0.14 does not expose: force-detaching a pinned link, reading a
//! cgroup link's target, swapping its program, what is attached to a cgroup, and raw array
//! slots.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

// The attribute words below pack two 32-bit fields into one u64 as a little-endian machine does.
#[cfg(not(target_endian = "little"))]
compile_error!("bpf attribute packing here assumes a little-endian machine");

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 8]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded union large enough for the commands used here.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = [0u64; 8];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The first 128 bytes of what BPF_OBJ_GET_INFO_BY_FD says of a link, map or program.
fn object_info(fd: std::os::fd::RawFd) -> std::io::Result<[u64; 16]> {
    let mut info = [0u64; 16];
    let mut attr = [0u64; 8];
    attr[0] = fd as u32 as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Detaches a link from its cgroup even if other file descriptors still refer to it.
pub fn link_detach(link: &OwnedFd) -> std::io::Result<()> {
    let mut attr = [0u64; 8];
    attr[0] = link.as_raw_fd() as u64;
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// What a cgroup link points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub program_id: u32,
    /// 0 once the link was detached or its cgroup removed.
    pub cgroup_id: u64,
}

pub fn cgroup_link_info(link: &OwnedFd) -> std::io::Result<CgroupLinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then the union at offset 16 (cgroup_id first).
    let info = object_info(link.as_raw_fd())?;
    Ok(CgroupLinkInfo {
        link_id: (info[0] >> 32) as u32,
        program_id: info[1] as u32,
        cgroup_id: info[2],
    })
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Writes `keys[i]` → `values[i]` in one call (BPF_MAP_UPDATE_BATCH, Linux 5.6; hash maps, and
/// LPM tries on kernels that have it):
/// 10,000 server entries cost one syscall instead of 10,000. `values` holds one value per key,
/// each `value_size` bytes.
pub fn map_update_batch<K: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
) -> std::io::Result<()> {
    batch(BPF_MAP_UPDATE_BATCH, map, keys, values.as_ptr() as u64)
}

/// Deletes `keys` in one call (BPF_MAP_DELETE_BATCH); every key must be present.
pub fn map_delete_batch<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> std::io::Result<()> {
    batch(BPF_MAP_DELETE_BATCH, map, keys, 0)
}

fn batch<K: Copy>(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[K],
    values: u64,
) -> std::io::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // union bpf_attr's `batch`: in_batch, out_batch, keys, values, count | map_fd << 32,
    // elem_flags, flags.
    let mut attr = [0u64; 8];
    attr[2] = keys.as_ptr() as u64;
    attr[3] = values;
    attr[4] = u64::from(count) | (map.as_raw_fd() as u64) << 32;
    let done = bpf(cmd, &mut attr);
    // The kernel writes back how many it processed; anything short is a failure.
    let processed = attr[4] as u32;
    match done {
        Ok(_) if processed == count => Ok(()),
        Ok(_) => Err(std::io::Error::other(format!(
            "{processed} of {count} entries processed"
        ))),
        Err(e) => Err(e),
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Keys read per call: far more than a hash bucket holds (a bucket larger than this is ENOSPC).
const LOOKUP_CHUNK: usize = 4096;

/// Every key of a map of `K` → `V`, a chunk per call (BPF_MAP_LOOKUP_BATCH, Linux 5.6): 10,000
/// server entries take 3 syscalls where walking them with BPF_MAP_GET_NEXT_KEY took 10,000.
/// Only for a hash or LPM-trie map whose key and value sizes are those of `K` and `V` (checked
/// first: the kernel writes what the map holds into buffers sized by the types). `None` when
/// the kernel has no batch lookup for this kind of map: the caller walks the keys.
pub fn map_keys_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
) -> std::io::Result<Option<Vec<K>>> {
    let info = map_info(map)?;
    let (key_size, value_size) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    if ![BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE].contains(&info.map_type)
        || info.key_size as usize != key_size
        || info.value_size as usize != value_size
    {
        return Err(std::io::Error::other(format!(
            "map of type {} with {}-byte keys and {}-byte values, not a list of {key_size}-byte keys",
            info.map_type, info.key_size, info.value_size
        )));
    }
    // A trie gives up with EINTR when keys vanish under a read that keeps restarting; the
    // scope lock makes that all but impossible, and a read that keeps failing fails the update.
    for _ in 0..3 {
        match keys_in_chunks::<K>(map, value_size, info.max_entries) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other,
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EINTR))
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;

fn keys_in_chunks<K: aya::Pod>(
    map: BorrowedFd<'_>,
    value_size: usize,
    max_entries: u32,
) -> std::io::Result<Option<Vec<K>>> {
    let mut all = Vec::new();
    // SAFETY: a `Pod` type is valid for any bytes, all zeros too.
    let mut keys = vec![unsafe { std::mem::zeroed::<K>() }; LOOKUP_CHUNK];
    let mut values = vec![0u8; LOOKUP_CHUNK * value_size];
    // The position tokens: a bucket index for hash maps, a key for a trie.
    let token = std::mem::size_of::<K>().max(8);
    let (mut from, mut to) = (vec![0u8; token], vec![0u8; token]);
    // A hash map's call stops short at a bucket that does not fit in what is left of the
    // chunk, so two calls in a row return more than a chunk: a map of n entries takes at most
    // 2n / chunk + 3 calls.
    for call in 0..2 * max_entries as usize / LOOKUP_CHUNK + 3 {
        // union bpf_attr's `batch`: in_batch, out_batch, keys, values, count | map_fd << 32.
        let mut attr = [0u64; 8];
        attr[0] = if call == 0 { 0 } else { from.as_ptr() as u64 };
        attr[1] = to.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = LOOKUP_CHUNK as u64 | (map.as_raw_fd() as u64) << 32;
        let done = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let count = (attr[4] as u32 as usize).min(LOOKUP_CHUNK);
        match done {
            Ok(_) if count > 0 => all.extend_from_slice(&keys[..count]),
            Ok(_) => break,
            // The end of the map, with the last chunk.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                all.extend_from_slice(&keys[..count]);
                return Ok(Some(all));
            }
            Err(e) if call == 0 && unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut from, &mut to);
    }
    Err(std::io::Error::other(
        "the map's keys did not come to an end (or a read returned none)",
    ))
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a map.
struct MapInfo {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn map_info(map: BorrowedFd<'_>) -> std::io::Result<MapInfo> {
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, ...
    let info = object_info(map.as_raw_fd())?;
    Ok(MapInfo {
        map_type: info[0] as u32,
        key_size: info[1] as u32,
        value_size: (info[1] >> 32) as u32,
        max_entries: info[2] as u32,
    })
}

/// EINVAL (no such command before 5.6), EOPNOTSUPP and the kernel's ENOTSUPP (524): the map
/// type has no batch command of this kind.
pub fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_QUERY: libc::c_long = 16;

/// Ids of the programs attached directly to `cgroup` for `attach_type` (0 ingress, 1 egress),
/// as the kernel reports them (BPF_PROG_QUERY), whoever attached them.
pub fn attached_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> std::io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = [0u64; 8];
    attr[0] = cgroup.as_raw_fd() as u32 as u64 | (u64::from(attach_type) << 32);
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = ids.len() as u64;
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = (attr[3] as u32 as usize).min(ids.len());
    Ok(ids[..count].to_vec())
}

/// The id of the program in slot `index` of a program array (what user space reads back).
pub fn program_in_slot(map: BorrowedFd<'_>, index: u32) -> std::io::Result<u32> {
    let value = array_value(map, index, 4)?;
    Ok(u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
}

/// The `value_size` bytes in slot `index` of an array map (a program array gives the id).
pub fn array_value(map: BorrowedFd<'_>, index: u32, value_size: usize) -> std::io::Result<Vec<u8>> {
    let mut value = vec![0u8; value_size];
    let mut attr = [0u64; 8];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = &index as *const u32 as u64;
    attr[2] = value.as_mut_ptr() as u64;
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_F_REPLACE`: a link update only if the link still runs the program named as old.
const BPF_F_REPLACE: u64 = 4;

/// A new file descriptor for the loaded program with this id.
pub fn program_by_id(id: u32) -> std::io::Result<OwnedFd> {
    let mut attr = [0u64; 8];
    attr[0] = u64::from(id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes the link run `new` instead of `old`, in one step, and only if it still runs `old`
/// (BPF_LINK_UPDATE with BPF_F_REPLACE): a link someone else changed meanwhile is left alone.
pub fn link_replace_program(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let mut attr = [0u64; 8];
    attr[0] = link.as_raw_fd() as u32 as u64 | (new.as_raw_fd() as u32 as u64) << 32;
    attr[1] = BPF_F_REPLACE | (old.as_raw_fd() as u32 as u64) << 32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Puts the program `program` in slot `index` of a program array.
pub fn set_program_in_slot(
    map: BorrowedFd<'_>,
    index: u32,
    program: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let value = program.as_raw_fd() as u32;
    let mut attr = [0u64; 8];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = &index as *const u32 as u64;
    attr[2] = &value as *const u32 as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// The device a TCX link is attached to; 0 once the device is gone.
pub fn tcx_link_ifindex(link: &OwnedFd) -> std::io::Result<u32> {
    // struct bpf_link_info: type, id, prog_id, then the union at offset 16 (tcx: ifindex first).
    const BPF_LINK_TYPE_TCX: u64 = 11;
    let info = object_info(link.as_raw_fd())?;
    if info[0] & 0xffff_ffff != BPF_LINK_TYPE_TCX {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    Ok(info[2] as u32)
}

/// Makes the link run `new` (BPF_LINK_UPDATE), in one step.
pub fn link_update_program(link: BorrowedFd<'_>, new: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = [0u64; 8];
    attr[0] = link.as_raw_fd() as u32 as u64 | (new.as_raw_fd() as u32 as u64) << 32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
