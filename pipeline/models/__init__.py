"""CPVT model zoo. Importing this package registers cpvt_{ti,s,b}[_gap] in timm's model registry."""
from .cpvt import CPVT, PEG, Attention, Block
from .loading import LoadReport, load_vit_state_dict

__all__ = ['CPVT', 'PEG', 'Attention', 'Block', 'LoadReport', 'load_vit_state_dict']
