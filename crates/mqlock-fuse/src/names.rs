//! Lock names of files: the path relative to the mount root, so that every node that mounts the
//! same shared directory derives the same name for the same file.

/// The lock name of the file at `rel` (relative to the mount root, `/`-separated, no leading
/// slash) in the namespace `prefix`: `fs:{prefix}/{rel}`.
///
/// File names may contain bytes that a lock name may not (control characters, invalid UTF-8);
/// [`mqlock::name::escape`] writes those, and `%` itself so that the mapping stays one-to-one,
/// as `%XX`. Long names are fine: the core hashes names that would not fit in a queue name.
/// `prefix` is taken as it is: the mount checks it once, when it starts.
pub fn lock_name(prefix: &str, rel: &[u8]) -> String {
    format!("fs:{prefix}/{}", mqlock::name::escape(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_stay_readable() {
        assert_eq!(lock_name("", b"dir/a b.txt"), "fs:/dir/a b.txt");
        assert_eq!(lock_name("team", b"x"), "fs:team/x");
    }

    #[test]
    fn every_file_name_maps_to_a_valid_distinct_lock_name() {
        let names: [&[u8]; 6] = [
            b"a\nb",
            b"a%0Ab",
            b"a\xffb",
            b"a%FFb",
            "a\u{85}b".as_bytes(),
            b"a b",
        ];
        let mapped: Vec<String> = names.iter().map(|n| lock_name("", n)).collect();
        for m in &mapped {
            mqlock::name::validate(m).unwrap();
        }
        for (i, a) in mapped.iter().enumerate() {
            for b in &mapped[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn long_paths_are_accepted_by_the_core() {
        let long = "d/".repeat(5000) + "f";
        let name = lock_name("", long.as_bytes());
        let q = mqlock::name::queue_names("mqlock.", &name).unwrap();
        assert!(q.lock.len() <= mqlock::name::MAX_QUEUE_NAME_BYTES);
    }
}
