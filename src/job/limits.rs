use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Limits a worker puts on every machine, and the defaults it derives from them
/// (worker.yml `limits`; taskcluster-worker's MachineLimits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MachineLimits {
    /// Largest machine memory in MiB; also the memory of a machine that sets none.
    #[schemars(range(min = 16, max = 1_048_576))]
    pub max_memory: u64,
    /// Largest number of vCPUs (threads × cores × sockets).
    #[serde(rename = "maxCPUs")]
    #[schemars(range(min = 1, max = 255))]
    pub max_cpus: u32,
    /// Threads per core to use when a machine sets no topology (2 on hosts with SMT).
    #[schemars(range(min = 1, max = 255))]
    pub default_threads: u32,
}

/// The vCPU topology of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub struct CpuTopology {
    pub threads: u32,
    pub cores: u32,
    pub sockets: u32,
}

impl CpuTopology {
    pub fn vcpus(self) -> u64 {
        u64::from(self.threads) * u64::from(self.cores) * u64::from(self.sockets)
    }
}

/// What a machine definition asks for; `None` means "choose for me".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestedResources {
    pub memory: Option<u64>,
    pub threads: Option<u32>,
    pub cores: Option<u32>,
    pub sockets: Option<u32>,
}

/// A request that the limits do not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitViolation {
    Memory { requested: u64, allowed: u64 },
    Cpus { topology: CpuTopology, allowed: u32 },
}

impl fmt::Display for LimitViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory { requested, allowed } => write!(
                f,
                "machine memory {requested} MiB is larger than the allowed {allowed} MiB"
            ),
            Self::Cpus { topology, allowed } => write!(
                f,
                "machine has {} vCPUs (threads {} × cores {} × sockets {}), more than the \
                 allowed {allowed}",
                topology.vcpus(),
                topology.threads,
                topology.cores,
                topology.sockets
            ),
        }
    }
}

impl MachineLimits {
    /// Fills in what the request leaves open and checks the result against the limits.
    ///
    /// This is taskcluster-worker's `ApplyLimits`, step for step: memory defaults to
    /// `maxMemory`; threads, cores and sockets default to 1; unset threads take
    /// `defaultThreads` if that fits; then unset cores, then unset threads, then unset
    /// sockets grow one at a time while the product stays within `maxCPUs`. Values the
    /// request sets are never changed; if they break a limit, that is reported instead.
    pub fn apply(
        &self,
        requested: RequestedResources,
    ) -> Result<(u64, CpuTopology), Vec<LimitViolation>> {
        let memory = requested.memory.unwrap_or(self.max_memory);
        let max = u64::from(self.max_cpus);
        let fits = |t: u32, c: u32, s: u32| u64::from(t) * u64::from(c) * u64::from(s) <= max;

        let mut threads = requested.threads.unwrap_or(1);
        let mut cores = requested.cores.unwrap_or(1);
        let mut sockets = requested.sockets.unwrap_or(1);

        if requested.threads.is_none() && fits(self.default_threads, cores, sockets) {
            threads = self.default_threads;
        }
        if requested.cores.is_none() {
            while fits(threads, cores + 1, sockets) {
                cores += 1;
            }
        }
        if requested.threads.is_none() {
            while fits(threads + 1, cores, sockets) {
                threads += 1;
            }
        }
        if requested.sockets.is_none() {
            while fits(threads, cores, sockets + 1) {
                sockets += 1;
            }
        }

        let topology = CpuTopology {
            threads,
            cores,
            sockets,
        };
        let mut violations = Vec::new();
        if memory > self.max_memory {
            violations.push(LimitViolation::Memory {
                requested: memory,
                allowed: self.max_memory,
            });
        }
        if topology.vcpus() > max {
            violations.push(LimitViolation::Cpus {
                topology,
                allowed: self.max_cpus,
            });
        }
        if violations.is_empty() {
            Ok((memory, topology))
        } else {
            Err(violations)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(max_cpus: u32, default_threads: u32) -> MachineLimits {
        MachineLimits {
            max_memory: 1024,
            max_cpus,
            default_threads,
        }
    }

    fn topology_for(max_cpus: u32, default_threads: u32) -> CpuTopology {
        limits(max_cpus, default_threads)
            .apply(RequestedResources::default())
            .expect("an empty request always fits")
            .1
    }

    fn topo(threads: u32, cores: u32, sockets: u32) -> CpuTopology {
        CpuTopology {
            threads,
            cores,
            sockets,
        }
    }

    // The examples from taskcluster-worker's MachineLimits documentation and tests.
    #[test]
    fn taskcluster_examples() {
        assert_eq!(topology_for(4, 1), topo(1, 4, 1));
        assert_eq!(topology_for(4, 2), topo(2, 2, 1));
        assert_eq!(topology_for(5, 2), topo(2, 2, 1));
    }

    #[test]
    fn default_threads_that_do_not_fit_fall_back_to_one() {
        assert_eq!(topology_for(1, 2), topo(1, 1, 1));
        assert_eq!(topology_for(3, 4), topo(1, 3, 1));
    }

    #[test]
    fn explicit_cores_leave_threads_then_sockets_to_grow() {
        let request = RequestedResources {
            cores: Some(2),
            ..Default::default()
        };
        let (_, t) = limits(8, 1).apply(request).expect("fits");
        // threads grows before sockets, as in taskcluster-worker.
        assert_eq!(t, topo(4, 2, 1));
    }

    #[test]
    fn memory_defaults_to_the_maximum_and_is_checked() {
        let (memory, _) = limits(1, 1)
            .apply(RequestedResources::default())
            .expect("fits");
        assert_eq!(memory, 1024);
        let err = limits(1, 1)
            .apply(RequestedResources {
                memory: Some(4096),
                ..Default::default()
            })
            .expect_err("too much memory");
        assert_eq!(
            err[0].to_string(),
            "machine memory 4096 MiB is larger than the allowed 1024 MiB"
        );
    }

    #[test]
    fn both_violations_are_reported() {
        let err = limits(2, 1)
            .apply(RequestedResources {
                memory: Some(2048),
                threads: Some(2),
                cores: Some(2),
                sockets: None,
            })
            .expect_err("too big");
        assert_eq!(err.len(), 2);
        assert_eq!(
            err[1].to_string(),
            "machine has 4 vCPUs (threads 2 × cores 2 × sockets 1), more than the allowed 2"
        );
    }

    fn any_limits() -> impl Strategy<Value = MachineLimits> {
        (16u64..65536, 1u32..=255, 1u32..=255).prop_map(
            |(max_memory, max_cpus, default_threads)| MachineLimits {
                max_memory,
                max_cpus,
                default_threads,
            },
        )
    }

    fn any_request() -> impl Strategy<Value = RequestedResources> {
        (
            proptest::option::of(16u64..131072),
            proptest::option::of(1u32..=255),
            proptest::option::of(1u32..=255),
            proptest::option::of(1u32..=255),
        )
            .prop_map(|(memory, threads, cores, sockets)| RequestedResources {
                memory,
                threads,
                cores,
                sockets,
            })
    }

    proptest! {
        #[test]
        fn accepted_machines_never_exceed_the_limits(l in any_limits(), r in any_request()) {
            if let Ok((memory, topology)) = l.apply(r) {
                prop_assert!(memory <= l.max_memory);
                prop_assert!(topology.vcpus() <= u64::from(l.max_cpus));
                prop_assert!(topology.threads >= 1 && topology.cores >= 1 && topology.sockets >= 1);
            }
        }

        #[test]
        fn explicit_values_are_never_changed(l in any_limits(), r in any_request()) {
            let (memory, topology) = match l.apply(r) {
                Ok(ok) => ok,
                Err(violations) => {
                    for v in violations {
                        match v {
                            LimitViolation::Memory { requested, .. } => {
                                prop_assert_eq!(Some(requested), r.memory);
                            }
                            LimitViolation::Cpus { topology, .. } => {
                                prop_assert!(r.threads.is_none_or(|t| t == topology.threads));
                                prop_assert!(r.cores.is_none_or(|c| c == topology.cores));
                                prop_assert!(r.sockets.is_none_or(|s| s == topology.sockets));
                            }
                        }
                    }
                    return Ok(());
                }
            };
            prop_assert!(r.memory.is_none_or(|m| m == memory));
            prop_assert!(r.threads.is_none_or(|t| t == topology.threads));
            prop_assert!(r.cores.is_none_or(|c| c == topology.cores));
            prop_assert!(r.sockets.is_none_or(|s| s == topology.sockets));
        }

        #[test]
        fn an_empty_request_always_fits(l in any_limits()) {
            prop_assert!(l.apply(RequestedResources::default()).is_ok());
        }
    }
}
