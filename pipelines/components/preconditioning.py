"""EDM preconditioning (Karras et al. 2022, Table 1): the one home of D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).

The training loss, the samplers, the pipeline and the discriminator's input scaling all use it.
Carried by saved pipelines (imported relatively by their component files): imports only torch and the
standard library.
"""

import math

import torch

PRECONDITIONINGS = ("edm", "vp", "ve")


def _as_float64(value) -> torch.Tensor:
    """Tensors keep their dtype; Python numbers become float64 tensors."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else value.to(torch.float64)
    return torch.as_tensor(value, dtype=torch.float64)


def vp_sigma(t, beta_d: float, beta_min: float) -> torch.Tensor:
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = _as_float64(t)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma, beta_d: float, beta_min: float) -> torch.Tensor:
    """Inverse of :func:`vp_sigma`: t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = _as_float64(sigma)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_sigma_deriv(t, beta_d: float, beta_min: float) -> torch.Tensor:
    """d sigma / dt of the VP schedule."""
    t = _as_float64(t)
    sigma = vp_sigma(t, beta_d, beta_min)
    return 0.5 * (beta_min + beta_d * t) * (sigma + 1 / sigma)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def network_dtype(network) -> torch.dtype:
    """The dtype a network computes in (diffusers' ``.dtype``, else its first parameter's, else float32)."""
    dtype = getattr(network, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    parameters = getattr(network, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.dtype
    return torch.float32


def output_tensor(output) -> torch.Tensor:
    """A network's output as a tensor: diffusers outputs carry ``.sample``, tuples their first item."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"network must return a tensor, a tuple or an output with .sample, got {type(output)}")


class EDMPreconditioning:
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) for ``kind`` "edm", "vp" or "ve" (EDM paper, Table 1).

    * edm: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4;
      supports sigma in (0, inf).
    * vp: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) t(s); supports
      [sigma(epsilon_t), sigma(1)] (about 0.001 to 152).
    * ve: c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2); supports [ve_sigma_min, ve_sigma_max] = [0.02, 100].
    """

    def __init__(
        self,
        kind: str = "edm",
        sigma_data: float = 0.5,
        vp_beta_d: float = 19.9,
        vp_beta_min: float = 0.1,
        vp_M: int = 1000,
        vp_epsilon_t: float = 1e-5,
        ve_sigma_min: float = 0.02,
        ve_sigma_max: float = 100.0,
    ):
        self.kind = check_choice("preconditioning kind", kind, PRECONDITIONINGS)
        check_positive(sigma_data=sigma_data, vp_beta_d=vp_beta_d, vp_M=vp_M, vp_epsilon_t=vp_epsilon_t,
                        ve_sigma_min=ve_sigma_min)
        if vp_beta_min < 0:
            raise ValueError(f"vp_beta_min must be >= 0, got {vp_beta_min!r}")
        if not ve_sigma_max > ve_sigma_min:
            raise ValueError(f"ve_sigma_max must be > ve_sigma_min={ve_sigma_min}, got {ve_sigma_max!r}")
        self.sigma_data = float(sigma_data)
        self.vp_beta_d = float(vp_beta_d)
        self.vp_beta_min = float(vp_beta_min)
        self.vp_M = int(vp_M)
        self.vp_epsilon_t = float(vp_epsilon_t)
        self.ve_sigma_min = float(ve_sigma_min)
        self.ve_sigma_max = float(ve_sigma_max)

    # The scheduler / discriminator config fields that define a preconditioning, by constructor argument.
    CONFIG_FIELDS = {"kind": "preconditioning", "sigma_data": "sigma_data", "vp_beta_d": "vp_beta_d",
                     "vp_beta_min": "vp_beta_min", "vp_M": "vp_M", "vp_epsilon_t": "vp_epsilon_t",
                     "ve_sigma_min": "ve_sigma_min", "ve_sigma_max": "ve_sigma_max"}

    @classmethod
    def from_config(cls, config) -> "EDMPreconditioning":
        """The preconditioning a component's config describes (fields it lacks take their defaults)."""
        get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
        values = {arg: get(field) for arg, field in cls.CONFIG_FIELDS.items()}
        return cls(**{arg: value for arg, value in values.items() if value is not None})

    def to_config(self) -> dict:
        """The config fields (CONFIG_FIELDS' names) that rebuild this preconditioning with :meth:`from_config`."""
        return {field: getattr(self, arg) for arg, field in self.CONFIG_FIELDS.items()}

    def __repr__(self) -> str:
        return f"EDMPreconditioning(kind={self.kind!r}, sigma_min={self.sigma_min:.6g}, sigma_max={self.sigma_max:.6g})"

    @property
    def sigma_min(self) -> float:
        """Lowest noise level this parameterisation supports."""
        if self.kind == "vp":
            return float(self.vp_sigma(self.vp_epsilon_t))
        return self.ve_sigma_min if self.kind == "ve" else 0.0

    @property
    def sigma_max(self) -> float:
        """Highest noise level this parameterisation supports."""
        if self.kind == "vp":
            return float(self.vp_sigma(1.0))
        return self.ve_sigma_max if self.kind == "ve" else math.inf

    def clip_sigma_range(self, sigma_min: float, sigma_max: float) -> tuple[float, float]:
        """A sampler's [sigma_min, sigma_max] clipped to what this parameterisation supports (VE: from 0.02)."""
        check_positive(sigma_min=sigma_min, sigma_max=sigma_max)
        low, high = max(float(sigma_min), self.sigma_min), min(float(sigma_max), self.sigma_max)
        if not high > low:
            raise ValueError(f"sigma range [{sigma_min}, {sigma_max}] is empty after clipping to the {self.kind!r} "
                             f"preconditioning's supported range [{self.sigma_min}, {self.sigma_max}]")
        return low, high

    def vp_sigma(self, t) -> torch.Tensor:
        return vp_sigma(t, self.vp_beta_d, self.vp_beta_min)

    def vp_sigma_inv(self, sigma) -> torch.Tensor:
        return vp_sigma_inv(sigma, self.vp_beta_d, self.vp_beta_min)

    def coefficients(self, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) at ``sigma``, each shaped like ``sigma`` (Python numbers: float64)."""
        sigma = _as_float64(sigma)
        one = torch.ones_like(sigma)
        if self.kind == "edm":
            sd = self.sigma_data
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
            c_in = 1 / (sigma**2 + sd**2).sqrt()
            c_noise = sigma.log() / 4
        elif self.kind == "vp":
            c_skip = one
            c_out = -sigma
            c_in = 1 / (sigma**2 + 1).sqrt()
            c_noise = (self.vp_M - 1) * self.vp_sigma_inv(sigma)
        else:
            c_skip = one
            c_out = sigma
            c_in = one
            c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise

    def denoise(self, network, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma) in float32 whatever the network's dtype; ``sigma`` is a number or has one value per sample.

        The network gets ``(c_in x)`` in its own dtype and ``c_noise`` of shape (B,); ``class_labels`` is
        passed only when given, so plain callables ``F(x, c_noise)`` work too.
        """
        return self._run(network, x, sigma, class_labels)[0]

    def denoise_with_logvar(self, network, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(D(x; sigma), u(sigma)) for a network with an uncertainty head (EDM2): it is called with
        ``return_logvar=True`` and its output carries ``.logvar`` (B, 1, 1, 1)."""
        message = (f"{type(network).__name__} has no uncertainty head (the uncertainty-weighted loss needs a network "
                   f"whose forward takes return_logvar=True: an EDM2 UNet)")
        try:
            denoised, output = self._run(network, x, sigma, class_labels, return_logvar=True)
        except TypeError as err:
            if "return_logvar" in str(err):
                raise TypeError(message) from err
            raise
        logvar = getattr(output, "logvar", None)
        if logvar is None and isinstance(output, (tuple, list)) and len(output) > 1:
            logvar = output[1]
        if logvar is None:
            raise TypeError(message)
        return denoised, logvar.to(torch.float32).reshape(x.shape[0], *(1,) * (x.ndim - 1))

    def _run(self, network, x: torch.Tensor, sigma, class_labels, **network_kwargs):
        x = x.to(torch.float32)
        batch = x.shape[0]
        # float64 coefficients (cast to float32 below); MPS has no float64.
        compute_dtype = torch.float32 if x.device.type == "mps" else torch.float64
        sigma = torch.as_tensor(sigma, device=x.device).to(compute_dtype)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(batch)
        elif sigma.numel() == batch:
            sigma = sigma.reshape(batch)
        else:
            raise ValueError(f"sigma must be a scalar or hold one value per sample ({batch}), got shape {tuple(sigma.shape)}")
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        view = (batch,) + (1,) * (x.ndim - 1)
        c_skip, c_out, c_in = (c.to(torch.float32).reshape(view) for c in (c_skip, c_out, c_in))
        kwargs = dict(network_kwargs) if class_labels is None else dict(network_kwargs, class_labels=class_labels)
        output = network((c_in * x).to(network_dtype(network)), c_noise.to(torch.float32), **kwargs)
        return c_skip * x + c_out * output_tensor(output).to(torch.float32), output
