//! Device isolation: a lease's processes may open its own cards' device nodes
//! (`/dev/nvidiaN`, group-owned by the lease's group, mode 0660) and no other card's (root's
//! alone, mode 0600). `CUDA_VISIBLE_DEVICES` only tells CUDA what to use; these permissions are
//! what keeps a lease off the cards it did not pay for. The shared control nodes
//! (`nvidiactl`, `nvidia-uvm`) are left as the driver made them.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Sets every `nvidiaN` node in `dir` to belong to the group `owners` gives its card index, or
/// to root alone. Nodes already right are not touched.
pub fn apply(dir: &Path, owners: &BTreeMap<u32, u32>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Some(index) = card_index(&entry.file_name().to_string_lossy()) else { continue };
        let (gid, mode) = owners.get(&index).map_or((0, 0o600), |gid| (*gid, 0o660));
        let path = entry.path();
        let meta = std::fs::metadata(&path)?;
        if meta.uid() != 0 || meta.gid() != gid {
            std::os::unix::fs::chown(&path, Some(0), Some(gid))?;
        }
        if meta.mode() & 0o7777 != mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// `nvidia3` → 3; `nvidiactl`, `nvidia-uvm` → none.
fn card_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("nvidia")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_card_nodes_are_named() {
        assert_eq!(card_index("nvidia0"), Some(0));
        assert_eq!(card_index("nvidia12"), Some(12));
        assert_eq!(card_index("nvidiactl"), None);
        assert_eq!(card_index("nvidia-uvm"), None);
        assert_eq!(card_index("nvidia"), None);
    }

    #[test]
    fn leased_cards_go_to_their_group_and_the_rest_to_root() {
        let dir = tempfile::TempDir::new().expect("dir");
        for name in ["nvidia0", "nvidia1", "nvidiactl"] {
            std::fs::write(dir.path().join(name), "").expect("stand-in");
            std::fs::set_permissions(dir.path().join(name), std::fs::Permissions::from_mode(0o666)).expect("chmod");
        }
        apply(dir.path(), &BTreeMap::from([(1, 4242)])).expect("applied");
        let mode = |n: &str| std::fs::metadata(dir.path().join(n)).expect("meta");
        assert_eq!((mode("nvidia0").gid(), mode("nvidia0").mode() & 0o777), (0, 0o600));
        assert_eq!((mode("nvidia1").gid(), mode("nvidia1").mode() & 0o777), (4242, 0o660));
        assert_eq!(mode("nvidiactl").mode() & 0o777, 0o666, "control nodes are left alone");
    }
}
