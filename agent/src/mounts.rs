//! Which filesystem a path is on: cgroup2 and bpffs are recognised by their magic numbers.
use std::path::Path;

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `BPF_FS_MAGIC` from linux/magic.h.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The filesystem type (statfs `f_type`) of `path`; None when it cannot be read.
pub fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own; `c` is a valid C string.
    let (ret, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st), st)
    };
    (ret == 0).then_some(st.f_type)
}

/// Whether `path` is a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_is_neither_cgroup2_nor_bpffs() {
        let magic = fs_magic(Path::new("/proc")).expect("/proc can be statfs'd");
        assert_ne!(magic, CGROUP2_SUPER_MAGIC);
        assert!(!is_bpffs(Path::new("/proc")));
        assert_eq!(fs_magic(Path::new("/no/such/path")), None);
    }
}
