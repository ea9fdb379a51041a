//! A pinned map is reused only when it has the shape this build's programs were compiled for:
//! writing into a map of another shape could let the programs read a policy that no one wrote.
//! When any map differs (an upgrade changed a size, or a plant), the new programs get a whole
//! new set of maps in a staging directory, share nothing with the programs in force, are
//! filled and attached, and only then are the staged pins moved over the old ones: each
//! direction goes from the whole old policy to the whole new one. Counters and the event ring
//! start again. The check sees type, sizes, capacity and flags, not what the bytes mean: a
//! change of a value's layout must change its size or its map's name.

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use super::sys;
use crate::error::{Error, Result};

/// The staging directory inside a scope's pin directory (map names are upper case).
pub const STAGING: &str = "upgrade";

/// What the kernel reports of a map, and what the object file declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The pinned maps of this build's object, by name.
pub fn expected() -> &'static BTreeMap<String, Shape> {
    static SHAPES: OnceLock<BTreeMap<String, Shape>> = OnceLock::new();
    SHAPES.get_or_init(|| {
        let object = aya_obj::Object::parse(super::OBJECT).expect("the built-in object parses");
        object
            .maps
            .iter()
            .filter(|(_, map)| map.pinning() == aya_obj::maps::PinningType::ByName)
            .map(|(name, map)| {
                let shape = Shape {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                    flags: map.map_flags(),
                };
                (name.clone(), shape)
            })
            .collect()
    })
}

/// The shape of the object pinned at `path`; `None` when it is not a map.
pub fn pinned(path: &Path) -> Result<Option<Shape>> {
    let fd = sys::obj_get(path).map_err(|e| Error::io("cannot open the pinned object", path, e))?;
    let info = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&info).map_err(|e| Error::io("cannot read", &info, e))?;
    let field = |key: &str| -> Option<u32> {
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))?
            .trim();
        match value.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        }
    };
    Ok((|| {
        Some(Shape {
            map_type: field("map_type")?,
            key_size: field("key_size")?,
            value_size: field("value_size")?,
            max_entries: field("max_entries")?,
            flags: field("map_flags")?,
        })
    })())
}

/// The maps pinned in `pin_dir` that this build cannot reuse (absent ones are simply made).
pub fn stale(pin_dir: &Path) -> Result<Vec<String>> {
    let mut stale = Vec::new();
    for (name, shape) in expected() {
        let path = pin_dir.join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        let found = pinned(&path)?;
        if found != Some(*shape) {
            let found = found.map_or("not a map".to_owned(), |f| f.to_string());
            tracing::info!(
                "the pinned map {} ({found}) is not what this build needs ({shape}): replacing it",
                path.display()
            );
            stale.push(name.clone());
        }
    }
    Ok(stale)
}

/// Makes an empty `pin_dir/upgrade`, where the loader then makes every map anew.
pub fn stage(pin_dir: &Path) -> Result<PathBuf> {
    remove_staging(pin_dir)?;
    let staging = pin_dir.join(STAGING);
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&staging)
        .map_err(|e| Error::io("cannot create", &staging, e))?;
    Ok(staging)
}

/// Refuses to work on a scope's maps while an upgrade of them is unfinished (a crash between
/// the link swap and [`promote`]): the programs in force may use the staged maps, so writes to
/// the old pins would change nothing. The next `up` stages and finishes anew.
pub fn check_not_staging(pin_dir: &Path) -> Result<()> {
    if pin_dir.file_name() != Some(STAGING.as_ref()) && pin_dir.join(STAGING).exists() {
        return Err(Error::Runtime(format!(
            "an upgrade of the maps in {} was interrupted; run `killswitch up` to finish it",
            pin_dir.display()
        )));
    }
    Ok(())
}

/// Moves every staged map over the pin of the same name (rename replaces atomically), once the
/// programs that use them are attached.
pub fn promote(pin_dir: &Path) -> Result<()> {
    let staging = pin_dir.join(STAGING);
    for name in expected().keys() {
        let staged = staging.join(name);
        if std::fs::symlink_metadata(&staged).is_ok() {
            std::fs::rename(&staged, pin_dir.join(name))
                .map_err(|e| Error::io("cannot move the new map into place", &staged, e))?;
        }
    }
    remove_staging(pin_dir)
}

/// Removes a staging directory an interrupted upgrade left. Its maps live on while programs use
/// them, except the ICMP-error program array, which the kernel empties with its last pin: until
/// the next `up` attaches anew, ICMP errors on the uplink are dropped (fails closed).
pub fn remove_staging(pin_dir: &Path) -> Result<()> {
    let staging = pin_dir.join(STAGING);
    let entries = match std::fs::read_dir(&staging) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("cannot read", &staging, e)),
    };
    for entry in entries {
        let path = entry
            .map_err(|e| Error::io("cannot read", &staging, e))?
            .path();
        std::fs::remove_file(&path).map_err(|e| Error::io("cannot remove", &path, e))?;
    }
    std::fs::remove_dir(&staging).map_err(|e| Error::io("cannot remove", &staging, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_declares_exactly_the_maps_the_loader_knows() {
        let mut declared: Vec<&str> = expected().keys().map(String::as_str).collect();
        let mut known = super::super::maps::ALL.to_vec();
        declared.sort();
        known.sort();
        // `down` removes the maps it knows: one it did not would keep the directory.
        assert_eq!(declared, known);
        for (name, shape) in expected() {
            let capacity = super::super::maps::capacity(name);
            if capacity != u32::MAX {
                assert_eq!(capacity, shape.max_entries, "{name}");
            }
        }
    }
}
