//! Operator settings: defaults that are not per-object (runtime image, GPU product labels).

use std::collections::HashMap;

use anneal_crds::GpuType;

/// Node label NVIDIA's GPU feature discovery puts the GPU model in.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// Extended resource of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Taint GPU health tooling puts on a node whose GPUs failed.
pub const GPU_HEALTH_TAINT_KEY: &str = "nvidia.com/gpu.health";

/// Settings shared by every object the operator reconciles.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Runtime image used when a resource does not name one.
    pub runtime_image: String,
    /// `nvidia.com/gpu.product` values that count as each GPU type.
    pub gpu_products: HashMap<GpuType, Vec<String>>,
    /// Seconds a worker tolerates a not-ready or unreachable node before stock eviction; short, so
    /// that eviction never lags far behind the operator's own failover.
    pub node_toleration_seconds: i64,
    /// How long a node that failed under a job stays excluded from that job's new workers.
    pub node_exclusion_seconds: i64,
    /// Node condition types that mean, when True, that the node's GPUs are unhealthy (the
    /// convention of node-problem-detector and NVIDIA's NVSentinel).
    pub gpu_health_conditions: Vec<String>,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        let products = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
        Self {
            runtime_image: format!(
                "ghcr.io/anneal-dev/anneal-runtime:{}",
                env!("CARGO_PKG_VERSION")
            ),
            gpu_products: HashMap::from([
                (
                    GpuType::A100,
                    products(&[
                        "NVIDIA-A100-SXM4-80GB",
                        "NVIDIA-A100-SXM4-40GB",
                        "NVIDIA-A100-PCIE-80GB",
                        "NVIDIA-A100-PCIE-40GB",
                    ]),
                ),
                (
                    GpuType::H100,
                    products(&[
                        "NVIDIA-H100-80GB-HBM3",
                        "NVIDIA-H100-PCIe",
                        "NVIDIA-H100-NVL",
                    ]),
                ),
            ]),
            node_toleration_seconds: 20,
            node_exclusion_seconds: 600,
            gpu_health_conditions: [
                "SysLogsXIDError",
                "SysLogsSXIDError",
                "SysLogsGPUFallenOff",
                "GpuUnhealthy",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl OperatorConfig {
    /// Product labels of a GPU type; `None` for `any` (no constraint on the product).
    pub fn products(&self, gpu_type: GpuType) -> Option<&[String]> {
        self.gpu_products.get(&gpu_type).map(Vec::as_slice)
    }
}
