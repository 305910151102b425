"""What a saved EchoDiff pipeline carries: the pipeline, its scheduler(s), the preconditioning, layers, the UNets,
the discriminator and guidance. Rule (tested): nothing here imports ``pipelines.*``; siblings are imported
relatively, and ``EchoDiffPipeline.save_pretrained`` copies them into each saved subfolder that needs them.
"""
