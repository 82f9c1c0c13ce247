//! Property tests of the vector-clock laws and the hybrid logical clock (SEMANTICS.md,
//! "Versions").
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::cmp::Ordering;

use pairdb::vclock::{CLOCK_EPOCH_MS, Causality, HybridClock, VectorClock, Version, next_version};
use proptest::prelude::*;

fn clock() -> impl Strategy<Value = VectorClock> {
    prop::collection::btree_map("c[0-4]", 0u64..6, 0..5).prop_map(VectorClock::from_entries)
}

fn version() -> impl Strategy<Value = Version> {
    clock().prop_map(Version::new)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn merge_is_commutative(a in clock(), b in clock()) {
        prop_assert_eq!(a.merge(&b), b.merge(&a));
    }

    #[test]
    fn merge_is_associative(a in clock(), b in clock(), c in clock()) {
        prop_assert_eq!(a.merge(&b).merge(&c), a.merge(&b.merge(&c)));
    }

    #[test]
    fn merge_is_idempotent_and_an_upper_bound(a in clock(), b in clock()) {
        prop_assert_eq!(a.merge(&a), a.clone());
        let m = a.merge(&b);
        prop_assert!(matches!(m.compare(&a), Causality::After | Causality::Equal));
        prop_assert!(matches!(m.compare(&b), Causality::After | Causality::Equal));
    }

    #[test]
    fn compare_is_antisymmetric(a in clock(), b in clock()) {
        prop_assert_eq!(a.compare(&b), b.compare(&a).reverse());
        prop_assert_eq!(a.compare(&b) == Causality::Equal, a == b);
    }

    #[test]
    fn compare_matches_pointwise_definition(a in clock(), b in clock()) {
        let ids: Vec<String> = a.iter().chain(b.iter()).map(|(id, _)| id.to_owned()).collect();
        let le = ids.iter().all(|id| a.get(id) <= b.get(id));
        let ge = ids.iter().all(|id| a.get(id) >= b.get(id));
        let expected = match (le, ge) {
            (true, true) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (false, false) => Causality::Concurrent,
        };
        prop_assert_eq!(a.compare(&b), expected);
    }

    #[test]
    fn precedence_is_a_total_order_extending_dominance(a in version(), b in version(), c in version()) {
        prop_assert_eq!(a.precedence(&b), b.precedence(&a).reverse());
        prop_assert_eq!(a.precedence(&b) == Ordering::Equal, a == b);
        if a.compare(&b) == Causality::After {
            prop_assert_eq!(a.precedence(&b), Ordering::Greater);
        }
        if a.precedence(&b) == Ordering::Greater && b.precedence(&c) == Ordering::Greater {
            prop_assert_eq!(a.precedence(&c), Ordering::Greater);
        }
    }

    #[test]
    fn winner_is_independent_of_arrival_order(versions in prop::collection::vec(version(), 1..7), shuffle in any::<prop::sample::Index>()) {
        let fold = |vs: &[Version]| -> Version {
            vs.iter().skip(1).fold(vs[0].clone(), |w, v| Version::winner(&w, v).clone())
        };
        let forward = fold(&versions);
        let mut reversed = versions.clone();
        reversed.reverse();
        let mut rotated = versions.clone();
        let k = shuffle.index(rotated.len());
        rotated.rotate_left(k);
        prop_assert_eq!(&forward, &fold(&reversed));
        prop_assert_eq!(&forward, &fold(&rotated));
        // The winner is one of the inputs and nothing dominates it.
        prop_assert!(versions.contains(&forward));
        for v in &versions {
            prop_assert_ne!(v.compare(&forward), Causality::After);
        }
    }

    #[test]
    fn restarted_clock_never_reissues_a_counter(
        steps in prop::collection::vec((0u64..5_000, any::<bool>(), any::<bool>(), 0u64..1_000_000, any::<bool>()), 1..200)
    ) {
        // Wall time wanders (including backwards); restarts happen at random; a restart resumes
        // from the last durable high-water mark only; storing a mark fails at random.
        let mut durable = 0u64;
        let mut clock = HybridClock::resume(durable);
        let mut issued_max = 0u64;
        let mut now = CLOCK_EPOCH_MS + 1_000_000;
        for (delta, backwards, restart, observed, fail_store) in steps {
            if restart {
                clock = HybridClock::resume(durable);
            }
            now = if backwards { now.saturating_sub(delta) } else { now + delta };
            let tick = clock.tick(now, observed);
            if let Some(hw) = tick.persist_high_water {
                prop_assert!(hw >= tick.counter);
                if fail_store {
                    // The mark could not be stored: the counter is not used, nothing moved.
                    prop_assert!(clock.last() < tick.counter);
                    continue;
                }
                durable = hw;
            }
            clock.persisted(tick);
            prop_assert!(tick.counter > issued_max, "counter {} after {}", tick.counter, issued_max);
            prop_assert!(tick.counter > observed);
            prop_assert!(tick.counter <= durable, "used a counter above the durable mark");
            issued_max = tick.counter;
        }
    }

    #[test]
    fn a_new_version_dominates_its_context_and_is_newer(ctx in clock(), counter_base in 1u64..1_000, now in 0u64..10_000) {
        let mut hlc = HybridClock::resume(counter_base);
        let tick = hlc.tick(CLOCK_EPOCH_MS + now, ctx.max_counter());
        let v = next_version(&ctx, "c9", tick.counter, 64);
        prop_assert_eq!(v.clock.compare(&ctx), Causality::After);
        prop_assert_eq!(v.writer(), Some("c9"));
        prop_assert!(v.precedence(&Version::new(ctx.clone())) == Ordering::Greater);
    }

    #[test]
    fn pruning_bounds_size_and_keeps_the_newest(entries in prop::collection::btree_map("[a-z]{1,3}", 1u64..1_000_000, 1..40), max in 1usize..10) {
        let full = VectorClock::from_entries(entries);
        let mut pruned = full.clone();
        pruned.prune(max);
        prop_assert!(pruned.len() <= max);
        prop_assert_eq!(pruned.max_entry(), full.max_entry());
        let smallest_kept = pruned.iter().map(|(_, c)| c).min().unwrap_or(0);
        for (id, c) in full.iter() {
            if pruned.get(id) == 0 {
                prop_assert!(c <= smallest_kept);
            }
        }
    }
}
