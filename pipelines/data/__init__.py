"""EchoNet-Dynamic data: the frame dataset's reader and builder, the synthetic generator, shared layout.

- ``frame_reader``: ``FrameDataset`` (torch ``Dataset``) and ``load_frames`` (several splits as one);
- ``frame_builder``: ``build_frame_dataset`` (resumable), its dataset card, ``push_frame_dataset``;
- ``synthetic_echonet``: ``write_synthetic_echonet`` (an EchoNet-layout folder), ``synthetic_frames``;
- ``layout``: EchoNet's CSV columns and split names, the frame dataset's schema, worker processes.
"""
