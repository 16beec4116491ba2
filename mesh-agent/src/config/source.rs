//! Where the configuration comes from, read again only where it changed.
//!
//! `--config` names a file or a directory. In a directory every `*.yaml`
//! file (dotfiles aside) contributes services and workloads; names are
//! unique across the directory and an error names its file. The mesh-wide
//! sections, `mesh:` and `nodes:`, may each be in one file only; every
//! file's services are checked against them. A reload
//! re-reads only the files whose size, modification time or inode changed
//! (or only the files inotify named), and re-parses only those whose
//! content hash changed.
//!
//! Within one file, each item of the `services:` list is hashed on its own:
//! an item whose text the last accepted load already had is not parsed
//! again. That shortcut is taken only for plainly laid out files (block
//! style, no anchors or aliases, which could tie one item to another); any
//! other file, and any file with an error, is parsed whole exactly as
//! before, so every message and position is the whole-file parser's.
//! Whether an item is valid depends on the other sections too (identities
//! for policies, nodes and the default mTLS mode), so a change to any of
//! `workloads:`, `mesh:` or `nodes:` makes the whole file (or directory)
//! parsed again: no item checked under the old sections is kept.
//!
//! A load yields an [`Update`]: the services that differ from the state
//! last committed. [`ConfigSource::commit`] makes it the new base once the
//! agent has applied it; a refused update leaves the base as it was.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ConfigError, MeshPart, Problem, invalid, parse_item, parse_part, parse_str};
use crate::state::{DesiredState, Mesh, Service, ServiceSet, Workload};

/// What to look at again.
#[derive(Clone, Debug)]
pub enum Scope {
    /// Everything (SIGHUP, the poll, start).
    All,
    /// Only these paths (inotify named them); a directory's other files are
    /// taken as unchanged.
    Paths(Vec<PathBuf>),
}

/// The difference between a load and the committed state.
#[derive(Debug, Default)]
pub struct Update {
    /// Services that changed: the new definition, or None when removed.
    pub services: BTreeMap<String, Option<Arc<Service>>>,
    /// The complete workload list, when it changed.
    pub workloads: Option<Arc<Vec<Workload>>>,
    /// The mesh (nodes, default mTLS mode), when it changed.
    pub mesh: Option<Arc<Mesh>>,
    next: Pending,
}

impl Update {
    /// An update of another source (no file bookkeeping).
    pub fn new(
        services: BTreeMap<String, Option<Arc<Service>>>,
        workloads: Option<Arc<Vec<Workload>>>,
        mesh: Option<Arc<Mesh>>,
    ) -> Self {
        Self {
            services,
            workloads,
            mesh,
            next: Pending::Nothing,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.workloads.is_none() && self.mesh.is_none()
    }
}

/// Bookkeeping that becomes current on commit (changes only, so that a
/// small change costs little however large the configuration is).
#[derive(Debug, Default)]
enum Pending {
    #[default]
    Nothing,
    /// The file's index, replaced whole (items by service name).
    File(NamedIndex),
    /// The file's index, changed in place.
    FileDelta {
        whole: Hash,
        removed: Vec<Hash>,
        added: Vec<(Hash, String)>,
        /// Every item's hash in file order.
        order: Vec<Hash>,
    },
    /// The directory's files, replaced whole.
    Dir(BTreeMap<String, DirEntry>),
    /// Some of the directory's files, changed.
    DirDelta {
        upsert: Vec<(String, DirEntry)>,
        removed: Vec<String>,
    },
}

/// Content hash (xxh3, 128 bits) of a piece of text.
type Hash = u128;

fn hash(bytes: &[u8]) -> Hash {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// The hash of the sections so far (0: none) and one more, in file order.
fn add_section(so_far: Hash, piece: &[u8]) -> Hash {
    let mut both = [0u8; 32];
    both[..16].copy_from_slice(&so_far.to_le_bytes());
    both[16..].copy_from_slice(&hash(piece).to_le_bytes());
    hash(&both)
}

/// Hashes a key that is already a hash: takes its low bits (maps keyed by
/// content hashes need no second hashing).
#[derive(Clone, Copy, Debug, Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_ne_bytes(word);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type ByHash = std::hash::BuildHasherDefault<Prehashed>;

/// What a file's last accepted load was made of.
#[derive(Clone, Debug, Default)]
struct FileIndex {
    /// Hash of the whole text.
    whole: Option<Hash>,
    /// Hash of the sections other than `services:` (`workloads:`, `mesh:`,
    /// `nodes:`; 0: none), when the file split.
    sections: Option<Hash>,
    /// Hash of each `services:` item → the name of its service.
    items: HashMap<Hash, Arc<Service>, ByHash>,
    /// The wrapping sum of the keys of `items`.
    sum: Hash,
    /// The keys of `items` in file order. Most items of a reload sit where
    /// they did, so a load compares with this in step before it looks an
    /// item up in `items` (each lookup a cache miss on a large file).
    order: Vec<Hash>,
}

/// A `FileIndex` before commit: items name their service.
#[derive(Debug, Default)]
struct NamedIndex {
    whole: Option<Hash>,
    sections: Option<Hash>,
    items: Vec<(Hash, String)>,
}

/// One file of a directory, as last accepted.
#[derive(Clone, Debug)]
struct DirEntry {
    stamp: Stamp,
    hash: Hash,
    names: Vec<String>,
    workloads: Vec<Workload>,
    /// The mesh sections the file has.
    mesh: MeshPart,
}

/// What tells a changed file from an unchanged one without reading it.
/// Kept for every file of a directory, so kept small: nanoseconds in an
/// i64 last until the year 2262.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        let ns = |s: i64, ns: i64| s.saturating_mul(1_000_000_000).saturating_add(ns);
        Self {
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

pub struct ConfigSource {
    path: PathBuf,
    dir: bool,
    /// The committed state: what the agent last applied from here.
    current: ServiceSet,
    /// Which service holds each frontend, for clashes of new services.
    frontends: HashMap<(SocketAddr, u8), Arc<Service>>,
    file: FileIndex,
    files: BTreeMap<String, DirEntry>,
}

impl ConfigSource {
    /// A source for `path` (a file, or a directory of `*.yaml` files),
    /// with nothing loaded yet.
    pub fn new(path: &Path) -> Self {
        Self {
            dir: path.is_dir(),
            path: path.to_owned(),
            current: ServiceSet::default(),
            frontends: HashMap::new(),
            file: FileIndex::default(),
            files: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_dir(&self) -> bool {
        self.dir
    }

    /// The last committed configuration.
    pub fn current(&self) -> &ServiceSet {
        &self.current
    }

    /// Reads what may have changed and returns how it differs from the
    /// committed state, or why it is refused.
    pub fn load(&self, scope: &Scope) -> Result<Update, ConfigError> {
        if self.dir {
            self.load_dir(scope)
        } else {
            self.load_file()
        }
    }

    /// Makes `update` the committed state (after the agent applied it).
    pub fn commit(&mut self, update: Update) {
        for (name, new) in &update.services {
            if let Some(old) = self.current.services.get(name) {
                for &proto in old.protocol.ip_protocols() {
                    let key = (old.frontend(), proto);
                    if self.frontends.get(&key).is_some_and(|s| s.name == *name) {
                        self.frontends.remove(&key);
                    }
                }
            }
            match new {
                Some(svc) => {
                    self.current.services.insert(name.clone(), svc.clone());
                }
                None => {
                    self.current.services.remove(name);
                }
            }
        }
        for svc in update.services.values().flatten() {
            for &proto in svc.protocol.ip_protocols() {
                self.frontends.insert((svc.frontend(), proto), svc.clone());
            }
        }
        if let Some(workloads) = update.workloads {
            self.current.workloads = workloads;
        }
        if let Some(mesh) = update.mesh {
            self.current.mesh = mesh;
        }
        match update.next {
            Pending::Nothing => {}
            Pending::File(index) => {
                let mut items = HashMap::default();
                let mut sum: Hash = 0;
                let mut order = Vec::with_capacity(index.items.len());
                for (h, name) in index.items {
                    if let Some(svc) = self.current.services.get(&name)
                        && items.insert(h, svc.clone()).is_none()
                    {
                        sum = sum.wrapping_add(h);
                        order.push(h);
                    }
                }
                self.file = FileIndex {
                    whole: index.whole,
                    sections: index.sections,
                    items,
                    sum,
                    order,
                };
            }
            Pending::FileDelta {
                whole,
                removed,
                added,
                order,
            } => {
                self.file.whole = Some(whole);
                for h in removed {
                    if self.file.items.remove(&h).is_some() {
                        self.file.sum = self.file.sum.wrapping_sub(h);
                    }
                }
                for (h, name) in added {
                    let Some(svc) = self.current.services.get(&name) else {
                        continue;
                    };
                    if self.file.items.insert(h, svc.clone()).is_none() {
                        self.file.sum = self.file.sum.wrapping_add(h);
                    }
                }
                // Every hash of this load is now a key of `items` (matched
                // ones were, new ones were just added); `items()` checks
                // before it relies on that.
                self.file.order = order;
            }
            Pending::Dir(files) => self.files = files,
            Pending::DirDelta { upsert, removed } => {
                for name in removed {
                    self.files.remove(&name);
                }
                self.files.extend(upsert);
            }
        }
    }

    // ------------------------------------------------------------ file ----

    fn load_file(&self) -> Result<Update, ConfigError> {
        let origin = self.path.display().to_string();
        let read_error = |source| ConfigError::Read {
            file: origin.clone(),
            source,
        };
        // Read as a stream of blocks, split into lines and pieces in place:
        // only new items are kept as text, so a large file is never held
        // in memory whole (unless it must be parsed whole).
        let mut file = std::fs::File::open(&self.path).map_err(read_error)?;
        let mut splitter = Splitter::default();
        let mut buf = vec![0u8; 1 << 18];
        let mut filled = 0;
        // First byte of the line not yet classified.
        let mut scan = 0;
        // The open piece: where it starts, and whether it is an item (or
        // another section).
        let mut open: Option<(usize, bool)> = None;
        let mut hashes: Vec<Hash> = Vec::with_capacity(self.file.order.len());
        let mut new_items: Vec<(Hash, Service)> = Vec::new();
        let mut sections_hash: Hash = 0;
        let mut plain = true;
        let identities: HashSet<&str> = self
            .current
            .workloads
            .iter()
            .map(|w| w.identity.as_str())
            .collect();
        let mut finish = |open: Option<(usize, bool)>, buf: &[u8], end: usize| -> bool {
            match open {
                Some((start, true)) => {
                    let bytes = &buf[start..end];
                    let h = hash(bytes);
                    let in_step = self.file.order.get(hashes.len()) == Some(&h);
                    hashes.push(h);
                    if !in_step && !self.file.items.contains_key(&h) {
                        // Parsed at once: no copy of the text is kept.
                        match std::str::from_utf8(bytes)
                            .ok()
                            .and_then(|t| parse_item(t, &identities, &self.current.mesh))
                        {
                            Some(svc) => new_items.push((h, svc)),
                            None => return false,
                        }
                    }
                }
                Some((start, false)) => {
                    sections_hash = add_section(sections_hash, &buf[start..end]);
                }
                None => {}
            }
            true
        };
        loop {
            if filled == buf.len() {
                // One piece fills the buffer: make room.
                buf.resize(buf.len() * 2, 0);
            }
            let n = std::io::Read::read(&mut file, &mut buf[filled..]).map_err(read_error)?;
            let fresh = &buf[filled..filled + n];
            if plain
                && (memchr::memchr3(b'&', b'*', b'\t', fresh).is_some()
                    || memchr::memchr(b'\r', fresh).is_some())
            {
                plain = false;
            }
            filled += n;
            let eof = n == 0;
            if plain {
                let base = scan;
                // Whole lines only, so no character is cut in two.
                let complete = if eof {
                    filled
                } else {
                    memchr::memrchr(b'\n', &buf[base..filled]).map_or(base, |i| base + i + 1)
                };
                if std::str::from_utf8(&buf[base..complete]).is_err() {
                    // The whole-file read reports it.
                    plain = false;
                    break;
                }
                let ends = memchr::memchr_iter(b'\n', &buf[base..filled])
                    .map(|i| base + i + 1)
                    .chain((eof && scan < filled).then_some(filled));
                for end in ends {
                    match splitter.line(&buf[scan..end]) {
                        None => {
                            plain = false;
                            break;
                        }
                        Some(Mark::Same) => {}
                        Some(mark) => {
                            plain &= finish(open, &buf, scan);
                            open = match mark {
                                Mark::Item => Some((scan, true)),
                                Mark::Section => Some((scan, false)),
                                _ => None,
                            };
                        }
                    }
                    scan = end;
                }
            }
            if eof {
                break;
            }
            if !plain {
                // Parsed whole below.
                break;
            }
            // Keep the open piece and the unfinished line; drop the rest.
            let keep = open.map_or(scan, |(start, _)| start.min(scan));
            buf.copy_within(keep..filled, 0);
            filled -= keep;
            scan -= keep;
            open = open.map(|(start, item)| (start - keep, item));
        }
        if plain {
            plain &= finish(open, &buf, filled);
        }
        drop(buf);
        // Unchanged items need no whole-file hash: all found, none new,
        // is an empty update.
        let whole = 0;
        if !plain || self.file.sections != Some(sections_hash) {
            // An unusual layout, or the identities (and so every policy),
            // the nodes or the default mode (and so every service) may
            // have changed.
            let bytes = std::fs::read(&self.path).map_err(read_error)?;
            return self.whole_file(&bytes, hash(&bytes), &origin);
        }
        match self.items(hashes, new_items, whole) {
            Some(update) => Ok(update),
            None => {
                let bytes = std::fs::read(&self.path).map_err(read_error)?;
                self.whole_file(&bytes, hash(&bytes), &origin)
            }
        }
    }

    /// The item shortcut: `hashes` of every item in order, the text of
    /// those the index lacks. None when anything is wrong (the whole-file
    /// parser then says what).
    fn items(
        &self,
        hashes: Vec<Hash>,
        parsed: Vec<(Hash, Service)>,
        whole: Hash,
    ) -> Option<Update> {
        let matched = hashes.len() - parsed.len();
        let known: HashSet<Hash, ByHash> = parsed.iter().map(|(h, _)| *h).collect();
        let matched_sum = hashes
            .iter()
            .filter(|h| !known.contains(*h))
            .fold(0u128, |sum, h| sum.wrapping_add(*h));
        // Items of the last load that are gone (changed ones included).
        let mut removed: Vec<Hash> = Vec::new();
        // Every indexed item is still there (the sum of their hashes tells
        // the same items from a repeated one), or find those that are not.
        if matched != self.file.items.len() || matched_sum != self.file.sum {
            // The usual edit: some services changed in place. Their old
            // items are the ones holding their current definition, and the
            // hash sum confirms that nothing else went.
            let replaced: Vec<&Arc<Service>> = parsed
                .iter()
                .filter_map(|(_, svc)| self.current.services.get(&svc.name))
                .collect();
            if replaced.len() == parsed.len() && hashes.len() == self.file.items.len() {
                let gone: Vec<Hash> = self
                    .file
                    .items
                    .iter()
                    .filter(|(_, svc)| replaced.iter().any(|r| Arc::ptr_eq(r, svc)))
                    .map(|(h, _)| *h)
                    .collect();
                let gone_sum = gone.iter().fold(0u128, |sum, h| sum.wrapping_add(*h));
                if gone.len() == parsed.len() && self.file.sum.wrapping_sub(gone_sum) == matched_sum
                {
                    removed = gone;
                }
            }
        }
        if removed.is_empty() && (matched != self.file.items.len() || matched_sum != self.file.sum)
        {
            let now: HashSet<Hash, ByHash> = hashes.iter().copied().collect();
            if now.len() != hashes.len() {
                // The same item twice: a duplicate the full parse reports.
                return None;
            }
            // Items taken as known because they matched `order` in step must
            // really be indexed; on this rare path, look each one up.
            if hashes
                .iter()
                .any(|h| !known.contains(h) && !self.file.items.contains_key(h))
            {
                return None;
            }
            removed.extend(
                self.file
                    .items
                    .keys()
                    .filter(|h| !now.contains(*h))
                    .copied(),
            );
        }
        let released: HashSet<&str> = removed
            .iter()
            .map(|h| self.file.items[h].name.as_str())
            .collect();
        let mut update = Update::default();
        for name in &released {
            update.services.insert((*name).to_owned(), None);
        }
        let mut added: HashSet<&str> = HashSet::new();
        let mut frontends: HashSet<(SocketAddr, u8)> = HashSet::new();
        for (_, svc) in &parsed {
            let clash = (self.current.services.contains_key(&svc.name)
                && !released.contains(svc.name.as_str()))
                || !added.insert(&svc.name)
                || svc.protocol.ip_protocols().iter().any(|&p| {
                    let key = (svc.frontend(), p);
                    !frontends.insert(key)
                        || self
                            .frontends
                            .get(&key)
                            .is_some_and(|holder| !released.contains(holder.name.as_str()))
                });
            if clash {
                return None;
            }
        }
        drop(added);
        drop(released);
        let mut new_items = Vec::with_capacity(parsed.len());
        for (h, svc) in parsed {
            new_items.push((h, svc.name.clone()));
            if self
                .current
                .services
                .get(&svc.name)
                .is_some_and(|old| **old == svc)
            {
                update.services.remove(&svc.name);
            } else {
                update
                    .services
                    .insert(svc.name.clone(), Some(Arc::new(svc)));
            }
        }
        update.next = Pending::FileDelta {
            whole,
            removed,
            added: new_items,
            order: hashes,
        };
        Some(update)
    }

    /// The whole file through the whole-file parser: exact errors, and the
    /// layouts the item shortcut does not take.
    fn whole_file(&self, bytes: &[u8], whole: Hash, origin: &str) -> Result<Update, ConfigError> {
        // As `read_to_string` always said of a file that is not UTF-8.
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::Read {
            file: origin.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        let state = parse_str(text, origin)?;
        // What a file without those sections reads as.
        let no_sections = state.workloads.is_empty() && state.mesh == Mesh::default();
        let mut update = self.diff(state);
        // Index the items too, so that the next change takes the shortcut
        // (this parses the items a second time; it happens when the other
        // sections change or the layout was unusual, not on every change).
        let split = std::str::from_utf8(bytes).ok().and_then(split);
        let mut index = NamedIndex {
            whole: Some(whole),
            sections: match &split {
                Some(s) => Some(
                    s.sections
                        .iter()
                        .fold(0, |h, r| add_section(h, &bytes[r.clone()])),
                ),
                None if no_sections => Some(0),
                None => None,
            },
            items: Vec::new(),
        };
        if let Some(split) = split {
            let identities: HashSet<&str> = update
                .workloads
                .as_deref()
                .unwrap_or(&self.current.workloads)
                .iter()
                .map(|w| w.identity.as_str())
                .collect();
            // Checked under the mesh of this load, not the committed one.
            let mesh = update.mesh.as_deref().unwrap_or(&self.current.mesh);
            for range in &split.items {
                let item = &text[range.clone()];
                if let Some(svc) = parse_item(item, &identities, mesh) {
                    index.items.push((hash(item.as_bytes()), svc.name));
                }
            }
        }
        update.next = Pending::File(index);
        Ok(update)
    }

    /// The update that turns the committed state into `state`.
    fn diff(&self, state: DesiredState) -> Update {
        let mut update = Update::default();
        let mut seen = HashSet::with_capacity(state.services.len());
        for svc in state.services {
            seen.insert(svc.name.clone());
            if self
                .current
                .services
                .get(&svc.name)
                .is_some_and(|old| **old == svc)
            {
                continue;
            }
            update
                .services
                .insert(svc.name.clone(), Some(Arc::new(svc)));
        }
        for name in self.current.services.keys() {
            if !seen.contains(name) {
                update.services.insert(name.clone(), None);
            }
        }
        if *self.current.workloads != state.workloads {
            update.workloads = Some(Arc::new(state.workloads));
        }
        if *self.current.mesh != state.mesh {
            update.mesh = Some(Arc::new(state.mesh));
        }
        update
    }

    // ------------------------------------------------------- directory ----

    /// The `*.yaml` files of the directory, by file name.
    fn list_dir(&self) -> Result<BTreeSet<String>, ConfigError> {
        let entries = std::fs::read_dir(&self.path).map_err(|source| ConfigError::Read {
            file: self.path.display().to_string(),
            source,
        })?;
        let mut names = BTreeSet::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_config_name(&name) {
                names.insert(name);
            }
        }
        Ok(names)
    }

    fn load_dir(&self, scope: &Scope) -> Result<Update, ConfigError> {
        // Which files to look at, and which are gone.
        let candidates: BTreeSet<String> = match scope {
            Scope::All => self.list_dir()?,
            Scope::Paths(paths) => paths
                .iter()
                .filter(|p| p.parent() == Some(self.path.as_path()))
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| is_config_name(n))
                .collect(),
        };
        let mut files: BTreeMap<String, DirEntry> = BTreeMap::new();
        let mut changed: BTreeMap<String, String> = BTreeMap::new();
        let mut gone: Vec<String> = Vec::new();
        if matches!(scope, Scope::All) {
            gone.extend(
                self.files
                    .keys()
                    .filter(|n| !candidates.contains(*n))
                    .cloned(),
            );
        }
        for name in &candidates {
            let path = self.path.join(name);
            let meta = match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => meta,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if self.files.contains_key(name) {
                        gone.push(name.clone());
                    }
                    continue;
                }
                Err(source) => {
                    return Err(ConfigError::Read {
                        file: path.display().to_string(),
                        source,
                    });
                }
            };
            let stamp = Stamp::of(&meta);
            if self.files.get(name).is_some_and(|e| e.stamp == stamp) {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|source| ConfigError::Read {
                file: path.display().to_string(),
                source,
            })?;
            let h = hash(&bytes);
            if let Some(entry) = self.files.get(name).filter(|e| e.hash == h) {
                files.insert(
                    name.clone(),
                    DirEntry {
                        stamp,
                        ..entry.clone()
                    },
                );
                continue;
            }
            files.insert(
                name.clone(),
                DirEntry {
                    stamp,
                    hash: h,
                    names: Vec::new(),
                    workloads: Vec::new(),
                    mesh: MeshPart::default(),
                },
            );
            changed.insert(name.clone(), utf8(bytes, &path)?);
        }
        if changed.is_empty() && gone.is_empty() {
            return Ok(Update {
                next: Pending::DirDelta {
                    upsert: files.into_iter().collect(),
                    removed: gone,
                },
                ..Update::default()
            });
        }
        // Parse the changed files against the other files' identities.
        let identities: HashSet<String> = self
            .current
            .workloads
            .iter()
            .map(|w| w.identity.clone())
            .collect();
        let mut parts = BTreeMap::new();
        // The identities, nodes or default mode may have changed: then
        // every file's services are checked again, by the full check.
        let mut sections_changed = gone.iter().any(|n| {
            self.files
                .get(n)
                .is_some_and(|e| !e.workloads.is_empty() || !e.mesh.is_empty())
        });
        for (name, text) in &changed {
            let origin = self.path.join(name).display().to_string();
            let part = match parse_part(text, &origin, &identities, &self.current.mesh) {
                Ok(part) => part,
                // Perhaps only an identity or a node from another changed
                // file: the full check below says.
                Err(_) => return self.whole_dir(),
            };
            let before = self.files.get(name);
            if before.map_or(&[][..], |e| e.workloads.as_slice()) != part.workloads.as_slice()
                || before.map_or(&MeshPart::default(), |e| &e.mesh) != &part.mesh
            {
                sections_changed = true;
            }
            parts.insert(name.clone(), part);
        }
        if sections_changed {
            return self.whole_dir();
        }
        // Names and frontends of the other files stay; the changed files'
        // services must not clash with them or with each other.
        let mut released: HashSet<&str> = HashSet::new();
        for name in changed.keys().chain(gone.iter()) {
            if let Some(entry) = self.files.get(name) {
                released.extend(entry.names.iter().map(String::as_str));
            }
        }
        let mut update = Update::default();
        for name in &released {
            update.services.insert((*name).to_owned(), None);
        }
        let mut names: HashSet<&str> = HashSet::new();
        let mut frontends: HashSet<(SocketAddr, u8)> = HashSet::new();
        for part in parts.values() {
            for l in &part.services {
                let svc = &l.service;
                let clash = (self.current.services.contains_key(&svc.name)
                    && !released.contains(svc.name.as_str()))
                    || !names.insert(&svc.name)
                    || svc.protocol.ip_protocols().iter().any(|&p| {
                        let key = (svc.frontend(), p);
                        !frontends.insert(key)
                            || self
                                .frontends
                                .get(&key)
                                .is_some_and(|holder| !released.contains(holder.name.as_str()))
                    });
                if clash {
                    return self.whole_dir();
                }
            }
        }
        for (file, part) in parts {
            let entry = files.get_mut(&file).expect("inserted above");
            entry.names = part
                .services
                .iter()
                .map(|l| l.service.name.clone())
                .collect();
            // Unchanged (checked above), but kept: a later removal of the
            // file must see what it held.
            entry.workloads = part.workloads;
            entry.mesh = part.mesh;
            for l in part.services {
                let svc = l.service;
                if self
                    .current
                    .services
                    .get(&svc.name)
                    .is_some_and(|old| **old == svc)
                {
                    update.services.remove(&svc.name);
                } else {
                    update
                        .services
                        .insert(svc.name.clone(), Some(Arc::new(svc)));
                }
            }
        }
        update.next = Pending::DirDelta {
            upsert: files.into_iter().collect(),
            removed: gone,
        };
        Ok(update)
    }

    /// Every file of the directory checked together, in file-name order:
    /// the exact error (naming its file), or the complete state.
    fn whole_dir(&self) -> Result<Update, ConfigError> {
        let names = self.list_dir()?;
        let mut files: BTreeMap<String, DirEntry> = BTreeMap::new();
        let mut texts: BTreeMap<String, String> = BTreeMap::new();
        for name in &names {
            let path = self.path.join(name);
            let read_error = |source| ConfigError::Read {
                file: path.display().to_string(),
                source,
            };
            let meta = std::fs::metadata(&path).map_err(read_error)?;
            if !meta.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(read_error)?;
            files.insert(
                name.clone(),
                DirEntry {
                    stamp: Stamp::of(&meta),
                    hash: hash(&bytes),
                    names: Vec::new(),
                    workloads: Vec::new(),
                    mesh: MeshPart::default(),
                },
            );
            texts.insert(name.clone(), utf8(bytes, &path)?);
        }
        let origin = |name: &str| self.path.join(name).display().to_string();
        // Workloads and the mesh first: every file's policies may name any
        // identity, and its backends any node.
        let mut workloads: Vec<Workload> = Vec::new();
        let mut workload_at: HashMap<String, (String, usize)> = HashMap::new();
        let mut mesh = Mesh::default();
        // Which file has `mesh:` and which `nodes:`.
        let mut mesh_file: Option<String> = None;
        let mut nodes_file: Option<String> = None;
        for (name, text) in &texts {
            let sections = super::sections_located(text, &origin(name))?;
            for (section, what, at, first) in [
                ("mesh", "defaults", sections.mesh_at, &mut mesh_file),
                ("nodes", "node list", sections.nodes_at, &mut nodes_file),
            ] {
                let Some(at) = at else { continue };
                if let Some(first_file) = first {
                    return Err(invalid(
                        &origin(name),
                        at,
                        Problem::SectionInTwoFiles {
                            section,
                            what,
                            first_file: first_file.clone(),
                        },
                    ));
                }
                *first = Some(origin(name));
            }
            if let Some(mode) = sections.mesh.default_mtls {
                mesh.default_mtls = mode;
            }
            if let Some(nodes) = sections.mesh.nodes {
                mesh.nodes = nodes;
            }
            for (w, at) in sections.workloads {
                if let Some((first_file, first_line)) = workload_at.get(&w.name) {
                    return Err(invalid(
                        &origin(name),
                        at,
                        Problem::DuplicateWorkloadInFile {
                            name: w.name,
                            first_file: first_file.clone(),
                            first_line: *first_line,
                        },
                    ));
                }
                workload_at.insert(w.name.clone(), (origin(name), at.line() as usize));
                workloads.push(w);
            }
        }
        let identities: HashSet<String> = workloads.iter().map(|w| w.identity.clone()).collect();
        let mut services: Vec<Service> = Vec::new();
        let mut name_at: HashMap<String, (String, usize)> = HashMap::new();
        let mut frontend_of: HashMap<(SocketAddr, u8), String> = HashMap::new();
        for (name, text) in &texts {
            let part = parse_part(text, &origin(name), &identities, &mesh)?;
            let entry = files.get_mut(name).expect("read above");
            entry.workloads = part.workloads;
            entry.mesh = part.mesh;
            for l in part.services {
                let svc = l.service;
                if let Some((first_file, first_line)) = name_at.get(&svc.name) {
                    return Err(invalid(
                        &origin(name),
                        l.name_at,
                        Problem::DuplicateNameInFile {
                            name: svc.name,
                            first_file: first_file.clone(),
                            first_line: *first_line,
                        },
                    ));
                }
                for &proto in svc.protocol.ip_protocols() {
                    if let Some(first) = frontend_of.get(&(svc.frontend(), proto)) {
                        return Err(invalid(
                            &origin(name),
                            l.vip_at,
                            Problem::DuplicateFrontend {
                                frontend: format!("{}/{}", svc.frontend(), svc.protocol),
                                service: svc.name,
                                first: first.clone(),
                            },
                        ));
                    }
                }
                name_at.insert(svc.name.clone(), (origin(name), l.name_at.line() as usize));
                for &proto in svc.protocol.ip_protocols() {
                    frontend_of.insert((svc.frontend(), proto), svc.name.clone());
                }
                entry.names.push(svc.name.clone());
                services.push(svc);
            }
            // Kept for as long as the file is: no room to grow.
            entry.names.shrink_to_fit();
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        workloads.sort_by(|a, b| a.name.cmp(&b.name));
        let mut update = self.diff(DesiredState {
            services,
            workloads,
            mesh,
        });
        update.next = Pending::Dir(files);
        Ok(update)
    }
}

/// A file's text, or the error `read_to_string` gives for one not in UTF-8.
fn utf8(bytes: Vec<u8>, path: &Path) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|e| ConfigError::Read {
        file: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// A directory's config files: `*.yaml`, not hidden (editors' and
/// Kubernetes' `..data` entries start with a dot).
fn is_config_name(name: &str) -> bool {
    name.ends_with(".yaml") && !name.starts_with('.')
}

/// Where a plainly laid out file's pieces are.
#[derive(Debug, PartialEq)]
pub(super) struct Split {
    /// The other sections (`workloads:`, `mesh:`, `nodes:`) in file order,
    /// each from its key line to the next piece.
    pub sections: Vec<Range<usize>>,
    /// Each item of `services:`, from its `-` line to the next item.
    pub items: Vec<Range<usize>>,
}

/// Splits a file into its other sections and `services:` items, or
/// None when its layout is not one this can split safely (flow style at
/// the top, anchors or aliases, tabs, several documents, other keys): such
/// files are parsed whole.
pub(super) fn split(text: &str) -> Option<Split> {
    let bytes = text.as_bytes();
    // memchr, not `contains`: the slice search is bytewise and was a tenth
    // of a reload.
    if memchr::memchr3(b'&', b'*', b'\t', bytes).is_some() || memchr::memchr(b'\r', bytes).is_some()
    {
        return None;
    }
    let mut splitter = Splitter::default();
    let mut items: Vec<Range<usize>> = Vec::new();
    let mut sections: Vec<Range<usize>> = Vec::new();
    // The open piece: where it starts and whether it is an item.
    let mut open: Option<(usize, bool)> = None;
    let mut close = |open: Option<(usize, bool)>, end: usize| match open {
        Some((start, true)) => items.push(start..end),
        Some((start, false)) => sections.push(start..end),
        None => {}
    };
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes)
        .map(|i| i + 1)
        .chain((bytes.last() != Some(&b'\n') && !bytes.is_empty()).then_some(bytes.len()))
    {
        match splitter.line(&bytes[start..end])? {
            Mark::Same => {}
            Mark::Close => close(open.take(), start),
            Mark::Item => close(open.replace((start, true)), start),
            Mark::Section => close(open.replace((start, false)), start),
        }
        start = end;
    }
    close(open, bytes.len());
    Some(Split { sections, items })
}

/// What a line does to the pieces of a plainly laid out file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mark {
    /// Belongs to the open piece (or to none, if none is open).
    Same,
    /// Ends the open piece and belongs to none (a top-level key).
    Close,
    /// Ends the open piece and starts a `services:` item.
    Item,
    /// Ends the open piece and starts another section (`workloads:`,
    /// `mesh:`, `nodes:`), read whole.
    Section,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Section {
    #[default]
    None,
    Services,
    /// A section read whole.
    Other,
}

/// Classifies a file's lines one by one (see `split`); the same rules for
/// a file in memory and one read as a stream.
#[derive(Debug, Default)]
pub(super) struct Splitter {
    section: Section,
    seen_services: bool,
    seen_workloads: bool,
    seen_mesh: bool,
    seen_nodes: bool,
    item_indent: Option<usize>,
    in_item: bool,
}

impl Splitter {
    /// The mark of one line (with its newline), or None when the file is
    /// not laid out plainly enough to split.
    #[inline]
    pub(super) fn line(&mut self, line: &[u8]) -> Option<Mark> {
        // The common case first: a line more indented than the items.
        if self.in_item
            && self.section == Section::Services
            && let Some(n) = self.item_indent
            && line.len() > n + 1
            && line[..=n].iter().all(|&b| b == b' ')
        {
            return Some(Mark::Same);
        }
        let indent = line.iter().take_while(|&&b| b == b' ').count();
        // Most lines continue an item: settle those at once.
        if indent > 0
            && (self.section == Section::Other
                || (self.section == Section::Services
                    && self.in_item
                    && self.item_indent.is_some_and(|n| indent > n)))
        {
            return Some(Mark::Same);
        }
        // Bytes, not text: UTF-8 is checked where a piece is parsed.
        let rest = line[indent..]
            .strip_suffix(b"\n")
            .unwrap_or(&line[indent..]);
        if rest.is_empty() || rest[0] == b'#' {
            return Some(Mark::Same);
        }
        let dash = rest == b"-" || rest.starts_with(b"- ");
        let top_key = |key: &str| -> bool {
            rest.strip_prefix(key.as_bytes()).is_some_and(|after| {
                let spaces = after.iter().take_while(|&&b| b == b' ').count();
                let after = &after[spaces..];
                after.is_empty() || after[0] == b'#'
            })
        };
        if indent == 0
            && !(self.section == Section::Services && self.item_indent == Some(0) && dash)
        {
            if top_key("services:") && !self.seen_services {
                self.seen_services = true;
                self.section = Section::Services;
                self.item_indent = None;
                self.in_item = false;
                return Some(Mark::Close);
            }
            // Each section once: a repeated key is the library's error.
            for (key, seen) in [
                ("workloads:", &mut self.seen_workloads),
                ("mesh:", &mut self.seen_mesh),
                ("nodes:", &mut self.seen_nodes),
            ] {
                if top_key(key) && !*seen {
                    *seen = true;
                    self.section = Section::Other;
                    self.in_item = false;
                    return Some(Mark::Section);
                }
            }
            if self.section == Section::Services && self.item_indent.is_none() && dash {
                self.item_indent = Some(0);
                self.in_item = true;
                return Some(Mark::Item);
            }
            return None;
        }
        match self.section {
            Section::None => None,
            Section::Other => Some(Mark::Same),
            Section::Services => match self.item_indent {
                None if dash => {
                    self.item_indent = Some(indent);
                    self.in_item = true;
                    Some(Mark::Item)
                }
                Some(n) if indent == n && dash => Some(Mark::Item),
                Some(n) if indent > n && self.in_item => Some(Mark::Same),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Option<(Vec<&str>, Vec<&str>)> {
        let s = split(text)?;
        Some((
            s.sections.into_iter().map(|r| &text[r]).collect(),
            s.items.into_iter().map(|r| &text[r]).collect(),
        ))
    }

    #[test]
    fn plain_files_split_into_items() {
        let text = "# header\nservices:\n  - name: a\n    port: 1\n\n  # about b\n  - name: b\n    backends: [{address: 1.2.3.4, port: 5}]\nworkloads:\n  - name: w\n    cgroup: /x\n";
        let (w, items) = pieces(text).unwrap();
        assert_eq!(
            items,
            [
                "  - name: a\n    port: 1\n\n  # about b\n",
                "  - name: b\n    backends: [{address: 1.2.3.4, port: 5}]\n"
            ]
        );
        assert_eq!(w, ["workloads:\n  - name: w\n    cgroup: /x\n"]);
        let (_, items) = pieces("services:\n- name: a\n  port: 1\n- name: b\n").unwrap();
        assert_eq!(items, ["- name: a\n  port: 1\n", "- name: b\n"]);
        assert_eq!(pieces("services:\n").unwrap(), (vec![], vec![]));
        assert_eq!(pieces("").unwrap(), (vec![], vec![]));
        // The mesh sections, in file order, each read whole.
        let text = "mesh:\n  mtls: strict\n# nodes next\nnodes:\n  - name: n\n    address: 10.0.0.1\nservices:\n  - name: a\n";
        let (sections, items) = pieces(text).unwrap();
        assert_eq!(
            sections,
            [
                "mesh:\n  mtls: strict\n# nodes next\n",
                "nodes:\n  - name: n\n    address: 10.0.0.1\n"
            ]
        );
        assert_eq!(items, ["  - name: a\n"]);
    }

    #[test]
    fn unusual_layouts_are_parsed_whole() {
        for text in [
            "services: []\n",
            "services:\n  - &a {name: a}\n  - *a\n",
            "version: 2\nservices:\n",
            "---\nservices:\n",
            "services:\n  - name: a\n services2:\n",
            "services:\n  - name: a\nservices:\n  - name: b\n",
            "nodes:\n  - name: a\nnodes:\n  - name: b\n",
            "mesh: {mtls: strict}\nservices:\n",
            "services:\n\t- name: a\n",
            "services:\r\n  - name: a\r\n",
            "  - name: a\n",
        ] {
            assert_eq!(split(text), None, "{text:?}");
        }
    }

    fn service_yaml(name: &str, vip: &str, port: u16) -> String {
        format!(
            "  - name: {name}\n    vip: {vip}\n    port: 80\n    backends: [{{address: 127.0.0.1, port: {port}}}]\n"
        )
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-source-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(update: &Update) -> Vec<(String, bool)> {
        update
            .services
            .iter()
            .map(|(n, s)| (n.clone(), s.is_some()))
            .collect()
    }

    /// Items that move, appear, vanish or change between reloads: after
    /// each load, the committed state equals a fresh whole-file parse (the
    /// item shortcut compares hashes in file order before it looks up).
    #[test]
    fn reloads_of_moved_and_changed_items_equal_a_fresh_parse() {
        let dir = temp_dir("moves");
        let path = dir.join("mesh.yaml");
        let write = |items: &[(usize, u16)]| {
            let body: String = items
                .iter()
                .map(|&(i, port)| service_yaml(&format!("s{i}"), &format!("10.0.1.{i}"), port))
                .collect();
            std::fs::write(&path, format!("services:\n{body}")).unwrap();
        };
        let mut items: Vec<(usize, u16)> = (0..8).map(|i| (i, 1000 + i as u16)).collect();
        write(&items);
        let mut source = ConfigSource::new(&path);
        let first = source.load(&Scope::All).unwrap();
        source.commit(first);
        // A fixed pseudo-random walk of edits (xorshift), bounded in count.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for step in 0..200 {
            let len = items.len();
            match next(7) {
                0 => items.reverse(),
                1 => {
                    let (a, b) = (next(len), next(len));
                    items.swap(a, b);
                }
                2 => items[next(len)].1 += 1,
                // Back to an earlier text: its hash was indexed once.
                3 => items[next(len)].1 -= 1,
                4 if len > 2 => {
                    items.remove(next(len));
                }
                5 if len < 12 => {
                    let free = (0..12).find(|i| items.iter().all(|(j, _)| j != i));
                    if let Some(i) = free {
                        items.insert(next(len + 1), (i, 2000 + step));
                    }
                }
                _ => {
                    let at = next(len);
                    let moved = items.remove(at);
                    items.push(moved);
                }
            }
            write(&items);
            let update = source.load(&Scope::All).unwrap();
            source.commit(update);
            let mut fresh = ConfigSource::new(&path);
            let all = fresh.load(&Scope::All).unwrap();
            fresh.commit(all);
            assert_eq!(source.current(), fresh.current(), "step {step}: {items:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_reload_reports_only_the_changed_items() {
        let dir = temp_dir("file");
        let path = dir.join("mesh.yaml");
        let text = |port_b: u16| {
            format!(
                "services:\n{}{}{}",
                service_yaml("a", "10.0.0.1", 1),
                service_yaml("b", "10.0.0.2", port_b),
                service_yaml("c", "10.0.0.3", 3)
            )
        };
        std::fs::write(&path, text(2)).unwrap();
        let mut source = ConfigSource::new(&path);
        let first = source.load(&Scope::All).unwrap();
        assert_eq!(first.services.len(), 3);
        source.commit(first);
        assert!(source.load(&Scope::All).unwrap().is_empty());
        std::fs::write(&path, text(9)).unwrap();
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(names(&update), [("b".into(), true)]);
        source.commit(update);
        std::fs::write(&path, text(10)).unwrap();
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(names(&update), [("b".into(), true)]);
        source.commit(update);
        assert_eq!(source.current().get("b").unwrap().backends[0].port, 10);
        // Removing an item removes its service; a clash goes the whole-file
        // way and gets its exact message.
        std::fs::write(
            &path,
            format!(
                "services:\n{}{}",
                service_yaml("a", "10.0.0.1", 1),
                service_yaml("c", "10.0.0.3", 3)
            ),
        )
        .unwrap();
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(names(&update), [("b".into(), false)]);
        source.commit(update);
        std::fs::write(
            &path,
            format!(
                "services:\n{}{}{}",
                service_yaml("a", "10.0.0.1", 1),
                service_yaml("c", "10.0.0.3", 3),
                service_yaml("d", "10.0.0.1", 4)
            ),
        )
        .unwrap();
        // An item repeated in place of another is a duplicate, not a no-op.
        std::fs::write(
            &path,
            format!(
                "services:\n{}{}",
                service_yaml("a", "10.0.0.1", 1),
                service_yaml("a", "10.0.0.1", 1)
            ),
        )
        .unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(
            err.contains(":6:11: service name 'a' is already used on line 2"),
            "{err}"
        );
        std::fs::write(
            &path,
            format!(
                "services:\n{}{}{}",
                service_yaml("a", "10.0.0.1", 1),
                service_yaml("c", "10.0.0.3", 3),
                service_yaml("d", "10.0.0.1", 4)
            ),
        )
        .unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(
            err.contains(
                ":11:10: service 'd' uses 10.0.0.1:80/tcp, which service 'a' already uses"
            ),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_that_is_not_utf8_cannot_be_read_as_before() {
        let dir = temp_dir("utf8");
        let path = dir.join("mesh.yaml");
        let mut bytes = format!("services:\n{}", service_yaml("a", "10.0.0.1", 1)).into_bytes();
        bytes.extend_from_slice(b"# \xff\n");
        std::fs::write(&path, bytes).unwrap();
        let err = ConfigSource::new(&path)
            .load(&Scope::All)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("{}: cannot read: ", path.display())),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_combines_its_files_and_rereads_only_changed_ones() {
        let dir = temp_dir("dir");
        std::fs::write(
            dir.join("a.yaml"),
            format!("services:\n{}", service_yaml("a", "10.0.0.1", 1)),
        )
        .unwrap();
        std::fs::write(
            dir.join("b.yaml"),
            format!("services:\n{}", service_yaml("b", "10.0.0.2", 2)),
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml").unwrap();
        let mut source = ConfigSource::new(&dir);
        assert!(source.is_dir());
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(names(&update), [("a".into(), true), ("b".into(), true)]);
        source.commit(update);
        // inotify named b.yaml only.
        std::fs::write(
            dir.join("b.yaml"),
            format!("services:\n{}", service_yaml("b", "10.0.0.2", 7)),
        )
        .unwrap();
        let update = source
            .load(&Scope::Paths(vec![dir.join("b.yaml")]))
            .unwrap();
        assert_eq!(names(&update), [("b".into(), true)]);
        source.commit(update);
        // A name used in another file is refused, naming both files.
        std::fs::write(
            dir.join("c.yaml"),
            format!("services:\n{}", service_yaml("a", "10.0.0.9", 1)),
        )
        .unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        let c = dir.join("c.yaml").display().to_string();
        let a = dir.join("a.yaml").display().to_string();
        assert!(
            err.starts_with(&format!(
                "{c}:2:11: service name 'a' is already used in {a} on line 2"
            )),
            "{err}"
        );
        // A broken file is refused with its name and position.
        std::fs::write(dir.join("c.yaml"), "services:\n  - name: 'c\n").unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{c}:2:11: ")), "{err}");
        std::fs::remove_file(dir.join("c.yaml")).unwrap();
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(names(&update), [("a".into(), false)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn policies_may_name_identities_of_other_files() {
        let dir = temp_dir("ids");
        std::fs::write(
            dir.join("w.yaml"),
            "workloads:\n  - name: frontend\n    cgroup: /sys/fs/cgroup/f\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("s.yaml"),
            "services:\n  - name: web\n    vip: 10.0.0.1\n    port: 80\n    policy: {default: deny, allow: [frontend]}\n    backends: [{address: 127.0.0.1, port: 1}]\n",
        )
        .unwrap();
        let mut source = ConfigSource::new(&dir);
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(update.workloads.as_ref().map(|w| w.len()), Some(1));
        source.commit(update);
        std::fs::write(
            dir.join("s.yaml"),
            "services:\n  - name: web\n    vip: 10.0.0.1\n    port: 80\n    policy: {default: deny, allow: [frontnd]}\n    backends: [{address: 127.0.0.1, port: 1}]\n",
        )
        .unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(
            err.contains("identity 'frontnd' in the policy of service 'web'"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One service item whose backend names `node` (None: names none).
    fn service_on(name: &str, vip: &str, port: u16, node: Option<&str>) -> String {
        let node = node.map(|n| format!(", node: {n}")).unwrap_or_default();
        format!(
            "  - name: {name}\n    vip: {vip}\n    port: 80\n    backends: [{{address: 127.0.0.1, port: {port}{node}}}]\n"
        )
    }

    fn nodes_yaml(names: &[&str]) -> String {
        let mut out = String::from("nodes:\n");
        for (i, name) in names.iter().enumerate() {
            out += &format!("  - name: {name}\n    address: 10.0.0.{}\n", i + 1);
        }
        out
    }

    #[test]
    fn a_file_reload_of_the_nodes_alone_carries_the_mesh() {
        let dir = temp_dir("nodes");
        let path = dir.join("mesh.yaml");
        let write = |mesh: &str, nodes: &[&str], b_node: Option<&str>, b_port: u16| {
            let text = format!(
                "{mesh}{}services:\n{}{}",
                nodes_yaml(nodes),
                service_on("a", "10.96.0.1", 1, Some("n1")),
                service_on("b", "10.96.0.2", b_port, b_node),
            );
            std::fs::write(&path, text).unwrap();
        };
        write("", &["n1", "n2"], Some("n2"), 2);
        let mut source = ConfigSource::new(&path);
        let first = source.load(&Scope::All).unwrap();
        assert_eq!(first.mesh.as_ref().map(|m| m.nodes.len()), Some(2));
        source.commit(first);
        assert_eq!(source.current().mesh.nodes[1].name, "n2");
        assert!(source.load(&Scope::All).unwrap().is_empty());

        // Only the nodes change: the mesh, and no service.
        write("", &["n1", "n2", "n3"], Some("n2"), 2);
        let update = source.load(&Scope::All).unwrap();
        assert!(update.services.is_empty(), "{:?}", update.services);
        assert_eq!(update.mesh.as_ref().map(|m| m.nodes.len()), Some(3));
        assert!(!update.is_empty());
        source.commit(update);
        assert_eq!(source.current().mesh.nodes.len(), 3);

        // An item-only change after that still takes the item shortcut,
        // checked against the committed nodes.
        write("", &["n1", "n2", "n3"], Some("n3"), 2);
        let update = source.load(&Scope::All).unwrap();
        assert!(matches!(update.next, Pending::FileDelta { .. }));
        assert_eq!(names(&update), [("b".into(), true)]);
        assert!(update.mesh.is_none());
        source.commit(update);

        // The nodes lose n3 while b's item stays as it was: the unchanged
        // item is checked again (it is not taken from the index) and the
        // reload is refused.
        write("", &["n1", "n2"], Some("n3"), 2);
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(
            err.contains(
                ":14:52: backend 127.0.0.1:2 of service 'b' names node 'n3', which is not in \
                 `nodes:` (known nodes: n1, n2)"
            ),
            "{err}"
        );
        // The nodes and the item change together: accepted.
        write("", &["n1", "n2"], Some("n2"), 2);
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(names(&update), [("b".into(), true)]);
        assert_eq!(update.mesh.as_ref().map(|m| m.nodes.len()), Some(2));
        source.commit(update);

        // A default of strict makes a valid service invalid: refused, and
        // the committed state stays.
        write("mesh:\n  mtls: strict\n", &["n1", "n2"], None, 2);
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(
            err.contains(
                "service 'b' is mtls strict (the mesh default, `mesh: mtls:`), but backend \
                 127.0.0.1:2 names no node"
            ),
            "{err}"
        );
        // The same default with b on a node: only the mesh changes.
        write("mesh:\n  mtls: strict\n", &["n1", "n2"], Some("n2"), 2);
        let update = source.load(&Scope::All).unwrap();
        assert!(update.services.is_empty());
        assert_eq!(
            update.mesh.as_ref().map(|m| m.default_mtls),
            Some(crate::state::MtlsMode::Strict)
        );
        source.commit(update);
        let mut fresh = ConfigSource::new(&path);
        let all = fresh.load(&Scope::All).unwrap();
        fresh.commit(all);
        assert_eq!(source.current(), fresh.current());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_checks_nodes_across_files() {
        let dir = temp_dir("dirnodes");
        let mesh_file = dir.join("00-mesh.yaml");
        let web_file = dir.join("10-web.yaml");
        let write_mesh = |mesh: &str| {
            std::fs::write(&mesh_file, format!("{mesh}{}", nodes_yaml(&["n1", "n2"]))).unwrap();
        };
        write_mesh("mesh:\n  mtls: permissive\n");
        let web = |port: u16, node: Option<&str>| {
            format!("services:\n{}", service_on("web", "10.96.0.1", port, node))
        };
        std::fs::write(&web_file, web(1, Some("n2"))).unwrap();
        let mut source = ConfigSource::new(&dir);
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(names(&update), [("web".into(), true)]);
        assert_eq!(update.mesh.as_ref().map(|m| m.nodes.len()), Some(2));
        source.commit(update);
        assert_eq!(
            source.current().get("web").unwrap().backends[0]
                .node
                .as_deref(),
            Some("n2")
        );

        // A change of the services file alone: that file only, against the
        // nodes of the other.
        std::fs::write(&web_file, web(2, Some("n1"))).unwrap();
        let update = source.load(&Scope::Paths(vec![web_file.clone()])).unwrap();
        assert!(matches!(update.next, Pending::DirDelta { .. }));
        assert_eq!(names(&update), [("web".into(), true)]);
        assert!(update.mesh.is_none());
        source.commit(update);
        let web_origin = web_file.display().to_string();
        let mesh_origin = mesh_file.display().to_string();
        std::fs::write(&web_file, web(2, Some("n3"))).unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{web_origin}:5:52: backend 127.0.0.1:2 of service 'web' names node 'n3', which \
                 is not in `nodes:` (known nodes: n1, n2)"
            )),
            "{err}"
        );
        std::fs::write(&web_file, web(2, None)).unwrap();
        let update = source.load(&Scope::All).unwrap();
        source.commit(update);

        // Strict by default in the mesh file: the services file, unchanged,
        // is checked again and refused.
        write_mesh("mesh:\n  mtls: strict\n");
        let err = source
            .load(&Scope::Paths(vec![mesh_file.clone()]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "{web_origin}:5:26: service 'web' is mtls strict (the mesh default, \
                 `mesh: mtls:`), but backend 127.0.0.1:2 names no node"
            )),
            "{err}"
        );
        write_mesh("mesh:\n  mtls: permissive\n");

        // A second `nodes:` or `mesh:` is refused, naming both files.
        let more = dir.join("20-more.yaml");
        std::fs::write(&more, nodes_yaml(&["n9"])).unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        let more_origin = more.display().to_string();
        assert!(
            err.starts_with(&format!(
                "{more_origin}:2:3: `nodes:` is also set in {mesh_origin}; set it in one file of \
                 the directory only (it holds the whole mesh's node list)"
            )),
            "{err}"
        );
        std::fs::write(&more, "mesh:\n  mtls: disabled\n").unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{more_origin}:2:3: `mesh:` is also set in {mesh_origin}; set it in one file"
            )),
            "{err}"
        );
        // Moved there from the mesh file: accepted.
        write_mesh("");
        let update = source.load(&Scope::All).unwrap();
        assert!(update.services.is_empty());
        assert_eq!(
            update.mesh.as_ref().map(|m| m.default_mtls),
            Some(crate::state::MtlsMode::Disabled)
        );
        source.commit(update);

        // Without the nodes, a backend that names one is refused.
        std::fs::write(&web_file, web(2, Some("n1"))).unwrap();
        let update = source.load(&Scope::All).unwrap();
        source.commit(update);
        std::fs::remove_file(&mesh_file).unwrap();
        let err = source.load(&Scope::All).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{web_origin}:5:52: backend 127.0.0.1:2 of service 'web' names node 'n1', but \
                 there is no `nodes:` list"
            )),
            "{err}"
        );
        let mut fresh = ConfigSource::new(&dir);
        assert!(fresh.load(&Scope::All).is_err());
        std::fs::write(&web_file, web(2, None)).unwrap();
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(update.mesh.as_ref().map(|m| m.nodes.len()), Some(0));
        source.commit(update);
        let all = fresh.load(&Scope::All).unwrap();
        fresh.commit(all);
        assert_eq!(source.current(), fresh.current());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file whose services changed (its workloads not) and that is then
    /// removed takes its workloads with it.
    #[test]
    fn a_removed_file_takes_its_workloads_after_an_incremental_change() {
        let dir = temp_dir("wremoved");
        let w = dir.join("w.yaml");
        let text = |port: u16| {
            format!(
                "workloads:\n  - name: frontend\n    cgroup: /sys/fs/cgroup/f\nservices:\n{}",
                service_yaml("a", "10.0.0.1", port)
            )
        };
        std::fs::write(&w, text(1)).unwrap();
        std::fs::write(
            dir.join("s.yaml"),
            format!("services:\n{}", service_yaml("b", "10.0.0.2", 2)),
        )
        .unwrap();
        let mut source = ConfigSource::new(&dir);
        let update = source.load(&Scope::All).unwrap();
        source.commit(update);
        std::fs::write(&w, text(3)).unwrap();
        let update = source.load(&Scope::All).unwrap();
        assert!(matches!(update.next, Pending::DirDelta { .. }));
        assert_eq!(names(&update), [("a".into(), true)]);
        source.commit(update);
        std::fs::remove_file(&w).unwrap();
        let update = source.load(&Scope::All).unwrap();
        assert_eq!(names(&update), [("a".into(), false)]);
        assert_eq!(update.workloads.as_ref().map(|w| w.len()), Some(0));
        source.commit(update);
        assert!(source.current().workloads.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
