import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the machine in every saved result: torch/triton versions and the GPU, if any."""
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
