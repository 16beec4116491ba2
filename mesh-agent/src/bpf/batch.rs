//! Batched map writes: `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`
//! (Linux 5.6+) on a map's file descriptor, which aya 0.14 does not offer.
//!
//! One syscall writes or deletes thousands of entries instead of one each,
//! which is what dominates programming a large configuration. The kernel
//! processes the elements in order and reports how many it finished, so a
//! failure tells exactly which writes happened (and must be undone). Where
//! the kernel or the map type lacks batch support, each call falls back to
//! one `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM` per element.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;

pub(crate) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub(crate) const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
pub(crate) const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's ENOTSUPP (not in libc): "operation not supported" for a map
/// type without batch operations.
const ENOTSUPP: i32 = 524;
/// Elements per syscall: bounds the per-CPU buffers and one call's time.
const CHUNK: usize = 8192;

/// `union bpf_attr`, the part the batch commands use.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr`, the part the element commands use (`value` is the
/// next-key buffer for `BPF_MAP_GET_NEXT_KEY`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct ElemAttr {
    pub(crate) map_fd: u32,
    pub(crate) _pad: u32,
    pub(crate) key: u64,
    pub(crate) value: u64,
    pub(crate) flags: u64,
}

/// A batch that stopped part way: `done` elements (the first ones) were
/// written or deleted, the rest were not.
#[derive(Debug, thiserror::Error)]
#[error("{source} (after {done} of the batch's elements)")]
pub struct BatchError {
    pub done: usize,
    #[source]
    pub source: io::Error,
}

pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size we
    // pass; the kernel reads it and may write `count` back.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// True when the error means "no batch operations here" rather than a
/// failure of one element.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// Writes `keys[i] → values[i]` for every i, in order (`BPF_ANY`).
/// `values` holds `value_size` bytes per key (for per-CPU maps: one
/// 8-byte-aligned value per possible CPU).
fn update_raw<K: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_size: usize,
) -> Result<(), BatchError> {
    assert_eq!(values.len(), keys.len() * value_size, "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done * value_size..].as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) => done += n,
            Err(e) if attr.count == 0 && unsupported(&e) => {
                return update_each(fd, &keys[done..], &values[done * value_size..], value_size)
                    .map_err(|mut err| {
                        err.done += done;
                        err
                    });
            }
            Err(source) => {
                return Err(BatchError {
                    done: done + attr.count as usize,
                    source,
                });
            }
        }
    }
    Ok(())
}

fn update_each<K: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_size: usize,
) -> Result<(), BatchError> {
    for (i, key) in keys.iter().enumerate() {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: values[i * value_size..].as_ptr() as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(|source| BatchError { done: i, source })?;
    }
    Ok(())
}

/// Writes `keys[i] → values[i]` for every i, in order.
pub fn update<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    // SAFETY: `V: Pod` is plain old data, so its bytes may be read as u8.
    let bytes = unsafe {
        std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values))
    };
    update_raw(fd, keys, bytes, size_of::<V>())
}

/// Sets every CPU's value of each index of a per-CPU array to zero.
pub fn zero_per_cpu<V: Pod>(
    fd: BorrowedFd<'_>,
    indices: &[u32],
    cpus: usize,
) -> Result<(), BatchError> {
    let per_cpu = size_of::<V>().next_multiple_of(8);
    let value_size = per_cpu * cpus;
    let mut done = 0;
    for chunk in indices.chunks(CHUNK) {
        let zeros = vec![0u8; chunk.len() * value_size];
        update_raw(fd, chunk, &zeros, value_size).map_err(|mut e| {
            e.done += done;
            e
        })?;
        done += chunk.len();
    }
    Ok(())
}

/// Sets each index of an array to `V`'s zero value.
pub fn zero<V: Pod + Default>(fd: BorrowedFd<'_>, indices: &[u32]) -> Result<(), BatchError> {
    let mut done = 0;
    for chunk in indices.chunks(CHUNK) {
        let zeros = vec![V::default(); chunk.len()];
        update(fd, chunk, &zeros).map_err(|mut e| {
            e.done += done;
            e
        })?;
        done += chunk.len();
    }
    Ok(())
}

/// Deletes every key, in order. A key that is not there stops the batch
/// with ENOENT (after the ones before it were deleted).
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => done += n,
            Err(e) if attr.count == 0 && unsupported(&e) => {
                for (i, key) in keys[done..].iter().enumerate() {
                    let mut attr = ElemAttr {
                        map_fd: fd.as_raw_fd() as u32,
                        key: key as *const K as u64,
                        ..ElemAttr::default()
                    };
                    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map_err(|source| BatchError {
                        done: done + i,
                        source,
                    })?;
                }
                return Ok(());
            }
            Err(source) => {
                return Err(BatchError {
                    done: done + attr.count as usize,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Deletes every key that is there, best effort: keys already gone are
/// skipped. Returns how many deletions failed for another reason.
pub fn delete_present<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> usize {
    let mut failures = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        match delete(fd, rest) {
            Ok(()) => break,
            Err(e) => {
                if e.source.raw_os_error() != Some(libc::ENOENT) {
                    failures += 1;
                }
                // Skip the element that stopped the batch.
                rest = &rest[(e.done + 1).min(rest.len())..];
            }
        }
    }
    failures
}

/// A new, unpinned BPF map, for tests that need a real kernel map of a
/// given shape (needs root).
#[cfg(test)]
pub(crate) fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;

    const BPF_MAP_CREATE: libc::c_long = 0;
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut attr = CreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: BPF_MAP_CREATE with a valid attr; returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &mut attr as *mut CreateAttr,
            size_of::<CreateAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use super::*;

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

    /// A fresh map, or None where this process may not create BPF maps.
    fn map(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> Option<OwnedFd> {
        create_map(map_type, key_size, value_size, max_entries)
            .map_err(|e| eprintln!("skipped: cannot create a BPF map here ({e})"))
            .ok()
    }

    fn lookup<K: Pod, V: Pod + Default>(fd: BorrowedFd<'_>, key: &K) -> Option<V> {
        let mut value = V::default();
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: &mut value as *mut V as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).ok().map(|()| value)
    }

    #[test]
    fn update_and_delete_in_batches() {
        let Some(fd) = map(BPF_MAP_TYPE_HASH, 4, 8, 20_000) else {
            return;
        };
        let fd = fd.as_fd();
        // More than one chunk, so the loop over chunks is exercised.
        let keys: Vec<u32> = (0..CHUNK as u32 + 100).collect();
        let values: Vec<u64> = keys.iter().map(|&k| u64::from(k) * 3).collect();
        update(fd, &keys, &values).unwrap();
        for k in [0u32, 1, CHUNK as u32, CHUNK as u32 + 99] {
            assert_eq!(lookup::<u32, u64>(fd, &k), Some(u64::from(k) * 3));
        }
        delete(fd, &keys[..10]).unwrap();
        assert_eq!(lookup::<u32, u64>(fd, &3), None);
        assert_eq!(lookup::<u32, u64>(fd, &10), Some(30));
        // A missing key stops a batch and says how far it got...
        let err = delete(fd, &[10u32, 11, 3, 12]).unwrap_err();
        assert_eq!(err.done, 2);
        assert_eq!(err.source.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(lookup::<u32, u64>(fd, &12), Some(36));
        // ...and delete_present skips it.
        assert_eq!(delete_present(fd, &[3u32, 12, 4, 13]), 0);
        assert_eq!(lookup::<u32, u64>(fd, &12), None);
        assert_eq!(lookup::<u32, u64>(fd, &13), None);
    }

    #[test]
    fn a_full_map_reports_how_many_were_written() {
        let Some(fd) = map(BPF_MAP_TYPE_HASH, 4, 4, 5) else {
            return;
        };
        let keys: Vec<u32> = (0..8).collect();
        let err = update(fd.as_fd(), &keys, &keys).unwrap_err();
        assert_eq!(err.done, 5, "{err}");
        assert_eq!(lookup::<u32, u32>(fd.as_fd(), &4), Some(4));
        assert_eq!(lookup::<u32, u32>(fd.as_fd(), &5), None);
    }

    #[test]
    fn per_cpu_values_are_zeroed() {
        let cpus = aya::util::nr_cpus().unwrap();
        let Some(fd) = map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 64) else {
            return;
        };
        let fd = fd.as_fd();
        // Set index 7 to non-zero on every CPU, then zero it with others.
        let ones = vec![0xffu8; 16 * cpus];
        update_raw(fd, &[7u32], &ones, 16 * cpus).unwrap();
        zero_per_cpu::<[u64; 2]>(fd, &[1, 7, 9], cpus).unwrap();
        let mut out = vec![0xaau8; 16 * cpus];
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: &7u32 as *const u32 as u64,
            value: out.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }
}
