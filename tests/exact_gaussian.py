"""Exact denoisers of Gaussian data for closed-form sampler and guidance tests.

For data N(mean, S^2 I) the ideal denoiser is D(x; sigma) = mean + S^2 / (S^2 + sigma^2) (x - mean), and
the optimal real-vs-model discriminator between two such Gaussians has a closed-form logit.
"""

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

RES, S, SD = 4, 0.5, 0.5  # 1x4x4 "images", data std s, EDM sigma_data
LOGIT_CLIP = math.log((1 - 1e-5) / 1e-5)  # DG's clip of d to [1e-5, 1 - 1e-5]


class ExactGaussianNet(ModelMixin, ConfigMixin):
    """The raw network F whose EDM-preconditioned denoiser is exact for data N(mean, S^2 I):
    D(x; sigma) = mean + S^2 / (S^2 + sigma^2) (x - mean)."""

    @register_to_config
    def __init__(self, mean=(0.0,) * RES * RES, sample_size=RES, in_channels=1):
        super().__init__()
        self.register_buffer("data_mean", torch.tensor(mean, dtype=torch.float64).reshape(1, 1, RES, RES))
        self.unused = torch.nn.Parameter(torch.zeros(()))  # gives the model a dtype / device

    def forward(self, x_in, c_noise, class_labels=None, return_dict=True):
        sigma = torch.exp(4 * c_noise.double()).reshape(-1, 1, 1, 1)
        x = x_in.double() * torch.sqrt(sigma**2 + SD**2)
        denoised = self.data_mean + S**2 / (S**2 + sigma**2) * (x - self.data_mean)
        c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / torch.sqrt(sigma**2 + SD**2)
        return ((denoised - c_skip * x) / c_out).float(),


class ExactLogRatio(torch.nn.Module):
    """log N(x; mu_r, (S^2 + sigma^2) I) - log N(x; mu_g, (S^2 + sigma^2) I): the optimal discriminator's logit."""

    def __init__(self, mu_real, mu_model):
        super().__init__()
        self.mu_r, self.mu_g = mu_real.reshape(1, -1).double(), mu_model.reshape(1, -1).double()
        self.calls = []

    def forward(self, x, sigma):
        self.calls.append(torch.as_tensor(sigma).detach().clone().double().reshape(-1))
        v = S**2 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        x = x.double().reshape(x.shape[0], -1)
        return ((((x - self.mu_g) ** 2).sum(1) - ((x - self.mu_r) ** 2).sum(1)) / (2 * v[:, 0])).float()
