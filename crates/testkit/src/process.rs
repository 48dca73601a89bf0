//! What the kernel says about a process the harness started: CPU time, for benchmarks that
//! report work per CPU-second.

/// User plus system CPU seconds `pid` has used so far, all its threads together (`utime` and
/// `stime`, fields 14 and 15 of `/proc/PID/stat`); `None` if it cannot be read.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = cpu_ticks(&stat)?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// `utime + stime` of one `/proc/PID/stat` line, in clock ticks. Fields are counted by
/// position from the last `)` (the command name may hold spaces and parentheses), and each
/// is read whole: some before them are negative (`tpgid` is -1 without a terminal), so
/// dropping what does not parse as unsigned would shift every later field.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // After the name: field 3 (state) is the first, so field N is at index N - 3.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `USER_HZ`: the unit of `/proc`'s times. Linux fixes it at 100 on every architecture this
/// project builds for (it is part of the user-space ABI, whatever the kernel's own `HZ`).
fn clock_ticks_per_second() -> f64 {
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line (a daemon without a controlling terminal: `tpgid` is -1), with a name that
    /// holds a space and a parenthesis.
    const STAT: &str = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 81234 0 12 0 5321 789 3 4 20 0 17 0 123456 1234567890 4321 18446744073709551615 1 1 0 0 0 0 0 4096 17920 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn reads_utime_and_stime_past_negative_fields() {
        assert_eq!(cpu_ticks(STAT), Some(5321 + 789));
    }

    #[test]
    fn a_truncated_line_reads_as_nothing() {
        assert_eq!(cpu_ticks("4242 (x) S 1 4242"), None);
        assert_eq!(cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_after_work_has_used_cpu_time() {
        let before = cpu_seconds(std::process::id()).expect("own stat");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        // Spin until the kernel has charged us at least two ticks of CPU time.
        while cpu_seconds(std::process::id()).expect("own stat") - before < 0.02 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "no CPU time charged after 30 s of spinning");
        }
        let used = cpu_seconds(std::process::id()).expect("own stat") - before;
        assert!(used <= started.elapsed().as_secs_f64() * 2.0 + 0.02, "one thread cannot use {used} s of CPU in {:?}", started.elapsed());
    }
}
