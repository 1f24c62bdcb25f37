"""Multi-scale backbones in plain PyTorch."""

from .hrnet import HRNet, hrnet_state_dict_from_release, hrnet_w18_small_v2, load_hrnet_pretrained

__all__ = ["HRNet", "hrnet_state_dict_from_release", "hrnet_w18_small_v2", "load_hrnet_pretrained"]
