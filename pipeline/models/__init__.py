"""Model code (torch only): VQGAN, quantizer, discriminator, LPIPS, losses, checkpoint import."""

from .convert import (
    config_from_taming,
    convert_taming_state_dict,
    loss_configs_from_taming,
    lpips_state_dict_from_taming,
)
from .discriminator import (
    DiscriminatorConfig,
    NLayerDiscriminator,
    generator_adversarial_loss,
    hinge_d_loss,
    set_requires_grad,
    vanilla_d_loss,
)
from .loss import (
    DiscriminatorLoss,
    GeneratorLoss,
    VQGANLoss,
    VQGANLossConfig,
    adaptive_weight_autograd,
    adaptive_weight_from_output_grads,
    adopt_weight,
    reconstruction_loss,
)
from .lpips import LPIPS, LPIPSConfig
from .quantize import QuantizerConfig, QuantizerOutput, VectorQuantizer
from .vqgan import VQGAN, Decoder, EncodeOutput, Encoder, VQGANConfig, VQGANOutput, VQGANTrainOutput

__all__ = [
    "LPIPS",
    "VQGAN",
    "Decoder",
    "DiscriminatorConfig",
    "DiscriminatorLoss",
    "EncodeOutput",
    "Encoder",
    "GeneratorLoss",
    "LPIPSConfig",
    "NLayerDiscriminator",
    "QuantizerConfig",
    "QuantizerOutput",
    "VQGANConfig",
    "VQGANLoss",
    "VQGANLossConfig",
    "VQGANOutput",
    "VQGANTrainOutput",
    "VectorQuantizer",
    "adaptive_weight_autograd",
    "adaptive_weight_from_output_grads",
    "adopt_weight",
    "config_from_taming",
    "convert_taming_state_dict",
    "generator_adversarial_loss",
    "hinge_d_loss",
    "loss_configs_from_taming",
    "lpips_state_dict_from_taming",
    "reconstruction_loss",
    "set_requires_grad",
    "vanilla_d_loss",
]
