"""One balanced-injection engine for every architecture.

* ``settings``: ``BalanceSettings`` (mode, granularity, max_lambda, λ
  convention, strength scaling, record) and the key MIControlNetSettings
  stores it under;
* ``engine``: ``BalancedInjection``, the per-call combine (sum | add^com) /
  inject (add | add^inj) / finite-check / record machinery, and
  ``BalanceRecord``;
* ``unet_sites``: where it acts in a UNet (input, middle, output skips);
* ``dit_sites``: where it acts in a DiT (SD3/SD3.5 joint blocks, Flux double
  and single blocks, Qwen-Image blocks), through ``patches_replace["dit"]``.

A site subclasses ``BalancedInjection``: it registers its patches on the
call's ``transformer_options``, finds the feature and the residuals at each
place, calls ``inject_items(feature, [(entry, residual)], layer)`` and, after
the forward, ``finish()``.
"""
