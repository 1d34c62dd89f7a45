//! Memory accounting from `/proc/<pid>/smaps`: how much of a process (or of one mapping, e.g. guest RAM) is
//! private to it and how much is shared page cache (the template's clean pages).

use std::io;
use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum SharingError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no mapping of process {pid} overlaps {start:#x}..{end:#x}")]
    NoMapping { pid: u32, start: u64, end: u64 },
}

/// Bytes (not kB) of each smaps counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryUsage {
    pub rss: u64,
    pub pss: u64,
    pub private_clean: u64,
    pub private_dirty: u64,
    pub shared_clean: u64,
    pub shared_dirty: u64,
    pub anonymous: u64,
    pub swap: u64,
}

impl MemoryUsage {
    /// Memory only this process maps (what each extra instance costs).
    pub fn private(&self) -> u64 {
        self.private_clean + self.private_dirty
    }

    pub fn shared(&self) -> u64 {
        self.shared_clean + self.shared_dirty
    }

    fn add_line(&mut self, line: &str) {
        let Some((key, rest)) = line.split_once(':') else {
            return;
        };
        let field = match key {
            "Rss" => &mut self.rss,
            "Pss" => &mut self.pss,
            "Private_Clean" => &mut self.private_clean,
            "Private_Dirty" => &mut self.private_dirty,
            "Shared_Clean" => &mut self.shared_clean,
            "Shared_Dirty" => &mut self.shared_dirty,
            "Anonymous" => &mut self.anonymous,
            "Swap" => &mut self.swap,
            _ => return,
        };
        let kb: u64 = rest
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0);
        *field += kb * 1024;
    }
}

/// A VMA header line: "start-end perms offset dev inode [path]" -> (start, end, path).
fn vma_header(line: &str) -> Option<(u64, u64, &str)> {
    let mut fields = line.splitn(6, ' ');
    let (s, e) = fields.next()?.split_once('-')?;
    // Counter lines ("Rss:   4 kB") have no '-' range in the first field, so they never parse here.
    let s = u64::from_str_radix(s, 16).ok()?;
    let e = u64::from_str_radix(e, 16).ok()?;
    // perms, offset, dev, inode; the path (which may contain spaces) is the rest, after padding.
    for _ in 0..4 {
        fields.next()?;
    }
    Some((s, e, fields.next().unwrap_or("").trim_start()))
}

fn read(path: PathBuf) -> Result<String, SharingError> {
    std::fs::read_to_string(&path).map_err(|source| SharingError::Read { path, source })
}

/// Sums the counters of the VMAs in `smaps` text for which `want(start, end, path)` is true; also returns
/// how many VMAs matched and their total size.
fn sum_smaps(text: &str, want: impl Fn(u64, u64, &str) -> bool) -> (MemoryUsage, usize, u64) {
    let mut usage = MemoryUsage::default();
    let mut matched = 0;
    let mut size = 0;
    let mut in_wanted = false;
    for line in text.lines() {
        if let Some((s, e, path)) = vma_header(line) {
            in_wanted = want(s, e, path);
            if in_wanted {
                matched += 1;
                size += e - s;
            }
        } else if in_wanted {
            usage.add_line(line);
        }
    }
    (usage, matched, size)
}

/// Totals for the whole process (smaps_rollup when the kernel has it, else the sum of smaps).
pub fn process_memory(pid: u32) -> Result<MemoryUsage, SharingError> {
    let rollup = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
    let text = match std::fs::read_to_string(&rollup) {
        Ok(t) => t,
        Err(_) => read(PathBuf::from(format!("/proc/{pid}/smaps")))?,
    };
    Ok(sum_smaps(&text, |_, _, _| true).0)
}

/// Totals for the mappings that overlap `[start, start + len)` (whole VMAs: a VMA extending past the range
/// is counted entirely, so pass a range that covers whole mappings, like a guest RAM region).
pub fn mapping_memory(pid: u32, start: u64, len: u64) -> Result<MemoryUsage, SharingError> {
    let end = start.saturating_add(len);
    let text = read(PathBuf::from(format!("/proc/{pid}/smaps")))?;
    let (usage, matched, _) = sum_smaps(&text, |s, e, _| s < end && e > start);
    if matched == 0 {
        return Err(SharingError::NoMapping { pid, start, end });
    }
    Ok(usage)
}

/// Totals, and the mapped size, of every mapping of the file at `path` in process `pid`; None when the
/// process maps none (for processes whose mapping addresses are unknown, like a benchmark's VMMs).
pub fn file_mappings_memory(
    pid: u32,
    path: &std::path::Path,
) -> Result<Option<(MemoryUsage, u64)>, SharingError> {
    let text = read(PathBuf::from(format!("/proc/{pid}/smaps")))?;
    let want = path.to_string_lossy();
    let (usage, matched, size) = sum_smaps(&text, |_, _, p| p == want);
    Ok((matched > 0).then_some((usage, size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 512 kB
Pss:                 256 kB
Shared_Clean:        512 kB
Private_Dirty:         0 kB
VmFlags: rd wr mr mw me ac
7f0000100000-7f0000200000 rw-p 00000000 fd:01 1234                       /tmp/mem-0.img
Rss:                   8 kB
Pss:                   8 kB
Private_Dirty:         8 kB
Swap:                  4 kB
";

    #[test]
    fn parses_ranges_and_counters() {
        let (all, n, size) = sum_smaps(SAMPLE, |_, _, _| true);
        assert_eq!(n, 2);
        assert!(size >= 0x100000);
        assert_eq!(all.rss, 520 * 1024);
        assert_eq!(all.pss, 264 * 1024);
        assert_eq!(all.shared(), 512 * 1024);
        assert_eq!(all.private(), 8 * 1024);
        assert_eq!(all.swap, 4 * 1024);
        let (second, n, _) = sum_smaps(SAMPLE, |s, e, _| s < 0x7f0000100001 && e > 0x7f0000100000);
        assert_eq!(n, 1);
        assert_eq!(second.rss, 8 * 1024);
    }

    #[test]
    fn parses_vma_headers_with_spaces_in_paths() {
        let line =
            "7f0000000000-7f0000200000 rw-p 00000000 fd:01 1234                       /tmp/a b.img";
        assert_eq!(
            vma_header(line),
            Some((0x7f0000000000, 0x7f0000200000, "/tmp/a b.img"))
        );
        assert_eq!(
            vma_header("7f0000000000-7f0000001000 rw-p 00000000 00:00 0 "),
            Some((0x7f0000000000, 0x7f0000001000, ""))
        );
        assert_eq!(vma_header("Rss:   4 kB"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = process_memory(std::process::id()).unwrap();
        assert!(me.rss > 0 && me.pss > 0);
        let v = vec![1u8; 1 << 20];
        let m = mapping_memory(std::process::id(), v.as_ptr() as u64, v.len() as u64).unwrap();
        assert!(m.rss > 0);
        assert!(matches!(
            mapping_memory(std::process::id(), 0x1000, 0x1000),
            Err(SharingError::NoMapping { .. })
        ));
    }
}
