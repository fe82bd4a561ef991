#!/usr/bin/env bash
# The GPU session's standard calls, in the order they paid off: compiled kernel tests, the
# kernel bandwidth table, end-to-end throughput (with transformers eager and static+compile),
# and the decode step beside the plain JAX static decoder. Each part has its own time limit so
# that one device command (10 minutes at most) gives whatever finished; logs and tables land in
# $OUT/<part>/. Pick parts by name, e.g. `bash bench/gpu_checks.sh tests bandwidth`.
#
#   fp8kv53     session 53: KV pools in fp8 (EngineConfig.kv_cache_dtype): compiled kernel tests over fp8 pools and the
#               bf16 decode / fused / prefill cases beside them, then bandwidth.py --fp8-only (~450 s)
#   fp8next54   session 54: the GPU form of the KV-scale check and its negative control, then Nsight Compute on the
#               decode kernel over 0.5B bf16 / fp8 pages (why 0.5B fp8 reads slower; with MemoryWorkloadAnalysis and
#               InstructionStats and a third case ncu crashed on the H100) (~250 s)
#   ragged55    session 55: rows finishing at their own lengths (ragged max_tokens) with chained decode calls going on
#               past them (engine.CHAIN_PAST_FINISHES) and not, 0.5B at 64 / 256 rows (bench/ragged_finish.py), then
#               structured.py's json rows, whose rows end at their own lengths (~200 s?)
#   arrivals55  session 55: prompts arriving mid-decode prefilled behind the decode call in flight
#               (engine.PREFILL_BEHIND_DECODE) and not: the policies run (bf16, 96 requests at 64/s) with it off and
#               on, each its own process; prefill_first's TTFT / TPOT rows are the ones it moves (~300 s?)
#   delta64     session 64: lora_delta's expand written in bf16 (no convert launch after it): the adapter tests on the
#               GPU, then bench/lora.py at 256 rows profiled, in this tree and in old_tree/ (`git archive` of the commit
#               before, untracked) (~380 s?)
#   parity65    session 65, after merged65 (the float32 engine off transformers on the GPU with or without adapters):
#               bench/f32_parity.py on the GPU and on its CPU (XLA's float32 product under each precision, the dense
#               model, the engine with the reference attention and the Pallas kernels, with and without an adapter),
#               then the dense model's transformers tests compiled (~150 s?)
#   parity65b   session 65, after parity65 (the engine 2e-3 off, the dense model 6e-7, on the GPU): XLA's float32 product
#               with Triton GEMMs off (the prefill steps' options) and its cuBLAS call; f32_parity.py's engines in
#               float32 (EngineConfig.dtype; "auto" is bfloat16 on a GPU) and in "auto"; the float32 transformers
#               tests (merged65's) with small_config's dtype float32 (~200 s?). Run first at 18de799 (engines in "auto",
#               float32 steps without the Triton-GEMM-off option: no change, reverted); as now written, not run yet
#   merged65    session 65, after merged64 failed on an H200: that float32 adapter test with its full errors, then with
#               the decode glue in XLA, the projections in XLA, the adapters' glue off, each its own process; the
#               float32 engine's transformers tests without adapters beside it (~140 s). Run 00:38 UTC on an H100: all
#               failed (the engines were bfloat16: EngineConfig "auto"; bench/results/f32_parity.md)
#   merged64    session 64: test_adapters_match_transformers_with_the_adapter_merged (a float32 engine with adapters
#               against transformers) on the GPU, in this tree and in old_tree/ when it is there, its errors shown (~150 s?)
#   lora57      session 57: adapter stacks a layer each (LoraSlots.weights; the stacked [layers, ...] form copied a
#               slice a projection out a step): bench/lora.py at 64 / 256 / 1 rows profiled at 64, with the check
#               against merged weights; then the same in old_tree/ (a `git archive` of the commit before, untracked:
#               the baseline in the same call) when it is there; the model step's adapter test compiled (~400 s?).
#               Not run: lora57c took its timings
#   lora57d     session 57: the term kernels' loops on Triton's software pipeline (JAXSERVE_LORA_STAGES=3): compiled
#               tests, then bench/lora.py at 64 / 256 rows (no check, profiled at 64), each its own process: XLA's
#               terms (the default), kernels with the inline shrink, with every shrink split (INLINE_K=0), with XLA's
#               shrink (~430 s?). Run 04:01 UTC on an H200: the staged runs failed to compile (shared memory)
#   lora59      session 59: adapter terms as the Mosaic GPU projections' extra K steps (model.LORA_FOLD with
#               LoraSlots' transposed expand stacks): the term's compiled kernel tests (0.5B's four projections at 64
#               and 256 rows among them), then bench/lora.py at 64 / 256 rows with the fold on (the bf16 check against
#               merged weights, profiled at 64) and off, each its own process (~500 s?)
#   lora59b     session 59, after lora59 (the fold on Mosaic GPU 0.69x / 0.64x against XLA's terms' 0.60x / 0.57x): the
#               shrink written in bf16 from LoraSlots' padded [T, in] stacks (no pad, no convert); the adapter step
#               tests on the GPU against the float32 model; bench/lora.py at 64 / 256 rows with the fold (bf16 check,
#               profiled at 64, 45 kernel groups, the decode HLO's convert fusions), then XLA's terms' bf16 check at 64
#               rows, the baseline for the fold's (~480 s?)
#   lora59c     session 59, the folded terms on the accumulating glue too (LORA_GLUE + LORA_FOLD: QKV, o and down add
#               theirs into the float32 accumulators): the term's compiled tests lora59 did not reach (down_proj's depth)
#               and the accumulate ones, the adapter step tests on the GPU, then bench/lora.py at 64 / 256 rows with
#               the fold on the glue (profiled at 64) and on the plain path, each its own process (~470 s?)
#   lora59d     session 59, LORA_FOLD and LORA_GLUE on by default: bench/lora.py at 1 / 64 / 256 rows with the
#               defaults (profiled at 64; the decode HLO's wrapped_convert fusions), then with both off (session 58's
#               defaults) at 64 / 256, each its own process (~350 s?)
#   lora59e     session 59, the folded shrinks of 896-wide inputs as one Triton launch keeping each row's own slot
#               (skinny_matmul own_slot; model.LORA_SHRINK_MAX_K): its compiled tests and the adapter step tests on the
#               GPU, then bench/lora.py at 64 / 256 rows with it (profiled at 64) and with XLA's product + select
#               (JAXSERVE_LORA_SHRINK_MAX_K=0), each its own process (~330 s?)
#   lora61      session 61: o_proj's and down_proj's LoRA shrinks as one XLA reduce fusion each, the own-slot select
#               its epilogue (model.LORA_SHRINK_REDUCE_ROWS), where the GEMM fusion runs the select as a launch of its
#               own: the adapter step's tests on the GPU, then bench/lora.py at 64 / 256 rows with it for o_proj
#               (896-wide inputs), for o_proj and down_proj (REDUCE_MAX_K=8192), and without it (the default), each
#               its own process, profiled at 64 (~500 s?)
#   lora61b     session 61: o_proj's LoRA shrink written by the fused attention (model.LORA_ATTENTION_SHRINK: each
#               program its KV head's part, o's Mosaic GPU term reading the parts over one expand stack): the kernel's
#               and the term's compiled tests, the adapter step tests on the GPU, then bench/lora.py at 64 / 256 rows
#               with it (profiled at 64), without it, and with it again, each its own process (~470 s?)
#   down62s     session 62, down62 in less device time: its tests, then the two processes at 64 rows only (~330 s?)
#   d62         session 62, one call: down62, then s62's compiled o-fold tests and the 0.5B one-row step's (~550 s?)
#   down62      session 62: down_proj's LoRA shrink made by its own kernel (column blocks past its weight's, added into
#               an accumulator the post-attention norm zeroes) and its expand added by the next norm
#               (model.LORA_DOWN_SHRINK), in place of XLA's split-K shrink, its reduce and select and down's term steps:
#               the kernels' compiled tests and the adapter step's routes on the GPU, then bench/lora.py at 64 / 256
#               rows with it and without it, each its own process, profiled at 64 (~450 s?)
#   s62         session 62: the one-row o_proj fold after session 61's read-through (_group_product, never compiled
#               since): the fused attention's compiled o-fold / early-gather / shrink tests and the 0.5B one-row step
#               against the reference, the one-row step timed and profiled (issue 8's 0.6 ms line), then lora61c and the 64-row default beside its prefetch-off run (~470 s?)
#   down63      session 63: bench/lora.py at 256 rows profiled there, with and without LORA_DOWN_SHRINK (~160 s)
#   lora61c     session 61, after lora61b (the attention's shrink: GPU busy a 64-row adapter step 1,428.9 -> 1,373.5 µs,
#               the attention 6.87 -> 7.82 µs a launch): bench/lora.py at 256 rows profiled there with the attention's
#               shrink and without it, then at 64 rows with the stack rows loaded after the attention
#               (JAXSERVE_ATTENTION_SHRINK_PREFETCH=0, profiled), each its own process (~170 s). Not run: its one try
#               (14:42 UTC) lost the machine mid-call and the device time was spent
#   lora60      session 60: QKV's and gate_up's LoRA shrinks written by the accumulating glue's norm kernels
#               (model.LORA_NORM_SHRINK; residual_norm.add_rms_norm's shrink): the norm's and the adapter step's tests
#               on the GPU, then bench/lora.py at 64 / 256 rows with it (bf16 check, profiled at 64), without it
#               (XLA's shrink + select, session 59's default; profiled), and with it again, each its own process
#               (~370 s)
#   lora60b     session 60, after lora60 (GPU busy a 64-row adapter step 1,512 -> 1,428 µs with the norms' shrinks):
#               bench/lora.py at 256 rows profiled there, XLA's shrinks against the norms' in 16- and 32-row chunks
#               (JAXSERVE_NORM_SHRINK_CHUNK), then 32-row chunks at 64 rows profiled, each its own process (~300 s?)
#   lora58      session 58: adapter terms folded into the plain path's skinny_matmul projections (model.LORA_FOLD):
#               the kernel's compiled lora tests, bench/lora.py's float32 check with it on, then at 64 / 256 rows off
#               against on, each its own process, profiled (~400 s; session 58: 336 s, the fold 0.45x against 0.54x)
#   lora58b     session 58, after lora58 (the fold lost: every program summed the shrink's 4-8 partial tiles at once):
#               bench/lora_fold.py at 64 rows (each projection's launches alone), then bench/lora.py at 64 rows with
#               the fold off, on with 8 and with 2 shrink splits, each its own process, profiled (~420 s; session 58:
#               317 s, both folds 0.45x against 0.52x)
#   lora58c     session 58, the term's loads moved before the weight loop, the shrink in 2 / 8 splits: bench/lora.py at
#               64 rows with the fold on (the float32 check, profiled), then off (~200 s; session 58: the fold's run
#               cut at 130 s before its table, its profile 1,905 µs busy against 1,844-1,868 for XLA's terms)
#   lora57f     session 57, after lora57d's staged runs failed to compile (K tiles of 128 on 3 stages asked the H200
#               for 240 KiB of shared memory; now 64), with the loops written out too: the staged and unrolled compiled
#               tests, then at 64 rows (profiled) XLA's terms against the kernels with their loops on 3 stages and
#               written out (JAXSERVE_LORA_UNROLL=1), each its own process (~250 s?)
#   lora57c     session 57, one call for lora57 + lora57b when starts are scarce: the xla-shrink kernels' compiled
#               tests, bench/lora.py at 64 / 256 rows (no check) with per-layer stacks, the stacked form (old_tree/),
#               and the xla-shrink kernels on the plain path, profiled at 64; lora_kernels.py's xla tilings (~540 s?).
#               Run 03:55 UTC on an H200 (297 s): per-layer stacks +7-14%, XLA's shrink a tie (bench/results/lora.md)
#   lora57b     session 57: the LoRA term kernels with XLA's shrink product (lora_matmul.SHRINK "xla"): their
#               compiled tests, bench/lora.py at 64 / 256 rows with them on the plain path and on the glue, profiled
#               at 64, then lora_kernels.py's xla-shrink tilings at 64 rows (~330 s?). Not run: lora57c took its
#               plain-path timings; the glue's with XLA's shrink is still to do
#   lora56      session 56: adapter terms as jaxserve_kernels.lora_matmul launches (model.LORA_KERNELS): the
#               kernels' compiled tests, bench/lora.py at 64 / 256 / 1 rows with glue and kernels on, as now (both
#               off), kernels on the plain path, each its own process, profiled at 64 rows; the kernels' tilings
#               against XLA's term (bench/lora_kernels.py); the model step's test (~580 s?). Run 02:16 UTC (part of
#               it, one call): slower than XLA's, LORA_KERNELS stays off (bench/results/lora.md)
#   lora55      session 55: adapter rows on the accumulating glue (model.LORA_GLUE): the model step's test compiled,
#               then bench/lora.py at 8 / 64 / 256 rows with JAXSERVE_LORA_GLUE=0 and =1, each its own process; flip
#               LORA_GLUE's default if =1 wins (~330 s?)
#   touch54     session 54: each layer's K/V pages read ahead by a kernel of their own (model.KV_TOUCH): its compiled
#               tests, then the decode step at 256 / 64 rows x 192 keys with it, with the command buffer's
#               concurrent scheduling, the read-ahead kernel's entries a program (2 / 4 / 8), and the read started
#               after the layer before's attention ("early") (~250 s)
#   fp8e2e53    session 53: throughput.py with bf16 and fp8 KV pools side by side, 0.5B 64 x 2k prompts and 256 x 128
#   tests       compiled Triton kernel tests + the model's paged decode step (~250 s on the H200 up to session 25;
#               session 26's device ran past 380 s inside test_kernels.py, so that file is now `tests_kernels`)
#   tests_kernels  test_kernels.py's compiled cases alone (paged attention, scatter, prefill)
#   tests_mgpu  compiled Mosaic GPU kernel tests (skinny matmul, experimental decode kernel) + the model's
#               steps through them (split from tests in session 17: together they ran past 400 s)
#   bandwidth   bench/bandwidth.py, all shapes and baselines (~300 s: a static-count loop compiles per shape)
#   throughput  bench/throughput.py at batch 1/64/256 + 1k prompts, transformers eager (~170 s)
#   hfcompile   bench/throughput.py at batch 256 with transformers static cache + torch.compile (~100 s)
#   step        bench/decode_step.py at batch 1 beside the static decoder (~150 s: its compile)
#   ncu         Nsight Compute on the paged decode (7B 64 x 2k) and fused decode (256 x 192) kernels (~120 s?);
#               NCU_CASES picks bench/ncu_probe.py's cases (pick_256: the greedy pick at 256 rows)
#   sweep       bench/bandwidth.py --sweep-only: our decode kernel's knobs at the shapes still short (~60 s)
#   sweep7b     session 13: bench/bandwidth.py --sweep-only at the 7B shapes a point short (64 x 8k, 8 x 2k):
#               pipeline stages 3/4, 8 warps, 4 pages a step with 4 stages (~90 s)
#   short       the decode step at batch 1/16/64/256, short tables unsplit (default) vs split (~60 s)
#   mosaic      the experimental Mosaic GPU decode kernel: its compiled tests, then each of its configs
#               timed beside ours on bandwidth.py's MOSAIC_SHAPES (~300 s)
#   qkv         the decode step at batch 1/16/64 with the QKV skinny matmul retiled (unsplit: no sum launch) (~90 s)
#   wideswiglu  session 13: gate_up + SwiGLU as one skinny-matmul kernel at 128/256 rows against cuBLAS + XLA's
#               SwiGLU (bench/skinny_tune.py; ~95 s). It won there by 16-20% but tied in the decode step
#               (the model's switch for it was removed: bench/results/decode_step.md, session 13)
#   nk          session 14: projection weights [out, in] (model.WEIGHT_LAYOUT "nk") through the skinny matmul's
#               [N, K] tiles: compiled skinny tests, the decode step at batch 1/16/64 against the default
#               (4 tilings; profile of each) and skinny_tune's per-matrix times of both layouts (~500 s)
#   gemv        session 14, after nk lost: the one-row lane-wise [N, K] path (4 tilings) and XLA's dots on
#               [N, K] weights against the default at batch 1 (profiled), XLA's dots at 16 and 64 (~300 s)
#   gemv2       session 14: the one-row path with whole-K tiles of 4-16 weight rows, more programs, 8 warps;
#               XLA's dots on [N, K] feeding the glue kernels (nk_xla_glue); batch 1, profiled (~250 s)
#   nkall       session 14: [N, K] weights at every batch: batch 1 one-row tilings (profiled), 16/64 tensor-core
#               tiles, 256 (cuBLAS) and prefill (bench/prefill_step.py, cuBLAS on each layout) (~420 s)
#   fold        session 14: compiled skinny / decode-attention / model tests, then batch 1 with each norm folded
#               into the projection after it (profiled) vs the [N, K] default vs [K, N], and 16 / 64 (~330 s)
#   fold2       session 14, norms folded by default: one-row tilings again at batch 1 (4 / 16 rows, 16 warps, no
#               fold), and batch 64's [N, K] tensor-core tile against [K, N] (~180 s)
#   fold3       session 15: the folded-norm kernel's tiling per projection (gate_up's SwiGLU blocks hold 16 rows:
#               64 weights a thread at 8 warps, the regime that was slowest unfolded): compiled norm tests, then
#               batch 1 with 2 / 4 rows a block, 16 / 4 warps, programs looping over blocks (264 / 528 / 132),
#               profiled (~250 s)
#   fold4       session 15, after fold3: around its best (gate_up 2 rows a block over 528 programs), QKV retiled,
#               the down projection's K loop with the next block loaded ahead (prefetch) or split otherwise,
#               the fused attention over 2 / 8 warps; batch 1, profiled (~200 s)
#   fold5       session 15, after fold4: its best ("b2") with the gate_up / QKV / o and down tiles over fewer warps
#               (rows a block = warps: each row's sum inside one warp?), batch 1, profiled (~120 s)
#   oattn       session 15: o_proj inside the fused attention at one row (model.O_IN_ATTENTION; every block
#               of Wo rows redoes the short attention): compiled tests, then batch 1 against the default over
#               4-32 Wo rows a program, Wo loaded before or after the attention; profiled (~200 s)
#   oattn2      session 15, o_proj in the attention by default: Wo rows a program 8-64, 4 / 8 warps, against
#               o_proj apart; batch 1, profiled (~120 s)
#   ncugemv     Nsight Compute on batch 1's gate_up (norm folded, 7.2 µs) against the down projection (4.55 µs
#               for the same 8.7 MB): bench/ncu_probe.py case gemv_b1 (~11 s in session 15; since then with the
#               instruction mix and source counters, to see where gate_up's ~25 instructions a weight go)
#   prof64      session 16: where batch 64's and 256's step goes (2.66x / 2.78x their roofline): the decode
#               step at 64 and 256 profiled per kernel (~150 s)
#   pdl         session 19: the Mosaic GPU projections as programmatic dependent launches (skinny_matmul_mgpu.PDL):
#               compiled tests, the decode step at 64 / 128 against the default (profiled: kernels that start
#               before the one ahead ended), and at 64 with XLA's own PDL off (--xla_gpu_enable_pdl=false) (~450 s)
#   ncu19       session 19: Nsight Compute with source-level stall sampling (bench/ncu_hotspots.py) on batch 64's
#               Mosaic GPU projections, the 0.5B 64 x 2k paged decode and the 64-row fused attention; then gate_up
#               at 64 rows with 5 / 6 slots and two-box steps in the decode step (~400 s)
#   gb2         session 19: gate_up + SwiGLU in steps of two 64-wide boxes (3 slots) at 32 / 64 rows (TILES) and
#               128 rows (WIDE_TILES) against the default, 7 alternating rounds, profiled (~300 s)
#   downb2      session 19: down_proj (and o) in two-box steps at 32 / 64 rows against the default (~150 s)
#   final19     session 19: the 64-row step with down_proj's two-box steps (default) against one box, then the
#               throughput table at batch 1/64/128/256 + 1k prompts with transformers eager (~380 s)
#   wideb2      session 19: 128-row steps with down_proj (or QKV, o and down) in two-box steps; the compiled
#               test of down's 64-row two-box tile (~200 s)
#   gwidth      session 19: 64-row gate_up over 16 (one-box steps) / 64 (two-box) rows of each half a program (~100 s)
#   acc         session 20: compiled tests of the accumulating glue (TMA-reduction "accumulate" epilogue, the seeded
#               norm, the fused attention of a float32 QKV), then the decode step at 32/64/128 rows with the
#               projections adding into a float32 residual stream (model.ACCUMULATE) against partial sums (~300 s)
#   acc256      session 20, run in session 21: batch 256 with QKV, o and down on Mosaic GPU adding into the float32
#               stream and gate_up on cuBLAS (mgpu256_xgu, now accumulating) against cuBLAS everywhere and against the same
#               route with partial sums (session 18's, -0.8%); the model test of that route compiled first (~200 s)
#   acc16       session 20, run in session 21: steps of 8 / 16 / 24 rows on the Mosaic GPU projections with ACCUMULATE's
#               glue (mgpu_min8) against Triton's skinny path and its partial sums (the default below 32 rows) (~150 s)
#   final21     session 21: the 256-row defaults' compiled tests, the 128-row step with gate_up on cuBLAS
#               (--glue xgu64), batch 128 end to end (~300 s)
#   defaults21  session 21: the step at 8-256 rows with session 21's defaults (seed programs, Mosaic GPU from 8 rows,
#               256 rows on Mosaic GPU with cuBLAS's gate_up) against session 20's (--glue before21) (~300 s)
#   pages22     session 22: our decode kernel at pages of 16 and 32 on the shapes short of issue 6 (~280 s)
#   gen22       session 22: two jaxserve.generate calls in one process (the second reuses the compiled steps)
#   pdl22       session 22: every Mosaic GPU projection as a dependent launch (accumulating ones too), with
#               XLA's command buffers on (default) and off (nographs): compiled tests, the step at 64 / 128 (~500 s)
#   graphs22    session 22: the decode loop inside XLA's command buffers (WHILE, any graph size) as one
#               compile's options, against the default, one process, at 64 / 256 rows (~200 s)
#   head23      session 23: the greedy LM head as one Mosaic GPU kernel (skinny_matmul_mgpu.argmax_matmul_mgpu):
#               compiled tests, then bench/lm_head.py at 64 / 128 / 256 rows against XLA's GEMM + the pick (~400 s)
#   head23b     session 23: the same in the model (model.GREEDY_HEAD): compiled tests (the engine's among them),
#               the step at 32 / 64 rows against XLA's GEMM + the greedy pick (~400 s)
#   sweep24     session 24: bench/bandwidth.py --sweep-only at 0.5B 64 x 2k: warps 2/8, stages 1/3, 8 splits (~60 s)
#   early25     session 25: the fused attention's first key block gathered before its QKV loads, RoPE and cache
#               write (jaxserve_kernels.decode_attention.EARLY_GATHER): its compiled tests, then the step at 1 / 64 / 256 rows
#               against the default, alternating rounds, with a profile (~400 s)
#   merge25     session 25: compiled tests of pick_blocks, the argmax head and the early gather; the 64-row step
#               with the greedy head's maxima merged by pick_blocks and without the early gather against the
#               default; the 128 / 256-row steps with the fused attention at one stage (the early gather then on)
#               (~300 s)
#   warps25     session 25, at its defaults (early gather and one stage up to 128 rows, pick_blocks): compiled tests
#               of pick_blocks, the argmax head, the early gather and the model's decode steps; the fused attention
#               with 8 warps against 4 at 64 / 128 / 256 rows (~330 s)
#   ppb25       session 25: the model's compiled decode-step tests, then the 64 / 128-row steps with the fused
#               attention gathering 16 pages (a 256-key table whole, early) an iteration, 4 and 8 warps (~250 s)
#   scale25     session 25: the add + RMSNorm kernel's weight loaded first: its compiled bitwise test, then the
#               64-row step against the default (~150 s)
#   hoist26     session 25 (run in 26: won, default on): the one-row folded-norm projections with the norm's weight and
#               bias loaded at the top (jaxserve_kernels.skinny_matmul.NORM_GEMV_HOIST): compiled bitwise test, then the
#               batch-1 step against the default (~150 s)
#   combine26   session 25 (run in 26: kept on): the split merge with its partials loaded beside the lse's
#               (jaxserve_kernels.split_combine.EARLY_PARTIALS): compiled tests, the 64-row step at 1,088 keys (4 splits, a
#               merge a layer) against the default in one process, then bandwidth.py's batch-1 32k rows in two
#               processes, off and on (~300 s)
#   early26     session 26: the 1 / 64 / 128-row steps with the RoPE tables as broadcast half tables
#               (jaxserve.model.ROPE_REPEAT) against concatenated ones (rope_concat); its run in session 26 also
#               timed two early key blocks of half the size (EARLY_BLOCKS: lost, removed) (~250 s)
#   final26     session 26, the session's last call: after `tests` ran past its limit in test_kernels.py, the
#               compiled tests of the files this session changed (fused attention, skinny matmul, norms, pick)
#               and the Mosaic GPU files' model steps (~500 s)
#   pack27      session 27 (ran at 79e7c5b + a fix; lost everywhere, removed, so the part is gone): the decode
#               kernel with two KV heads a program (kv_pack) swept in bandwidth.py (bandwidth.md, session 27)
#   ahead27     session 27 (ran in reduced form at baeb1dd; tied or lost, removed, so the part is gone): the decode
#               kernel's key loop loading the next block's page ids or K/V by hand (bandwidth.md, session 27)
#   g30         session 30: gate_up's block width against the SMs (blocks of 24 / 40 / 48 columns, the last
#               ragged) in the 64-row step, after the compiled SwiGLU tests (ragged cases included)
#   head30      session 30: the greedy LM head's block width at 64 rows (bench/lm_head.py)
#   bal30       session 30: compiled SwiGLU / balanced / accumulate tests and the model steps on the GPU; the
#               64-row step with gate_up's old blocks, balanced (stream-K) accumulating projections, the head's
#               block width, one-step K splits; the 256-row step balanced
#               (the balanced glue settings were removed after this call: they lost)
#   more30      session 30: the 64-row step with the greedy head over 192 / 256 vocabulary rows a program and
#               down_proj over 56 columns (its HLO dumped), the 128-row step with gate_up over 40 columns a program
#   final30     session 30: end to end with no per-step log-probability writes and gate_up's 40-column blocks at
#               65-128 rows (no transformers); the decode loop unrolled 2 / 8 steps against the while loop; end to
#               end again unrolled 8; the compiled SwiGLU and 128-row model tests
#   sass30      session 30: ncu source-level stall samples of batch 64's Mosaic GPU projections, the SASS
#               page as CSV (where `CCTL.IVALL` sits)
#   j31         session 31: gate_up's two halves as one WGMMA of N = 2 x block_n ("joint"): compiled tests, the
#               64-row step over 32-48 columns, the 256-row step with gate_up on Mosaic GPU joint or not and the fused
#               attention over 4 pages an iteration (~550 s)
#   j31b        session 31: the joint 128-row gate_up tile as the 256-row default (gate_up off cuBLAS) against the
#               route before and two wider tiles, throughput at 64 / 256, the compiled 256-row model test, and the
#               joint tile at 128 rows (~580 s)
#   j31c        session 31: throughput at the final defaults (joint gate_up at every row count), 128 rows a program
#               for the 256-row K-split products, the compiled 128-row tests (~440 s)
#   next31      written in session 31, not yet run: the compiled 256 x 2048 accumulate case in 128-row blocks,
#               then the 256-row step with down_proj in 128-row programs and gate_up's joint 128-row tile on two
#               slots (32 / 40 columns) (~300 s)
#   s32         session 32: throughput at 1 / 64 / 256 + 1k prompts with down_proj's 256-row 128-row programs, then
#               Nsight Compute on the 256-row greedy argmax (logits read at 1.1-1.3 TB/s cold) and fused attention
#               (~250 s)
#   pick32      session 32: the greedy pick's chunks fitted to one wave (WAVE_FIT: 2 a row at 256 rows, 512 programs)
#               against one chunk more (768: 1.45 waves): compiled greedy_pick tests, then the 256- and 128-row
#               steps (~250 s)
#   final32     session 32: throughput at 1 / 64 / 256 + 1k prompts with the wave-fitted greedy pick (~110 s)
#   cb29        session 29: the 64- and 256-row steps with XLA's command buffer scheduled serially, concurrently
#               where the data allows, or in the latency-hiding scheduler's order, and with XLA's PDL off (~300 s)
#   pick29      session 29: the greedy pick's argmax alone (logprobs=False, 29 µs of the 256-row step) over
#               block / warps / stages / programs at 128 and 256 rows (bench/greedy_pick_tune.py; ~150 s)
#   kernels29   session 29: test_kernels.py's compiled cases that final28 left out (prefill, scatter) (~250 s?)
#   final28     session 28's defaults compiled: test_kernels.py's decode and lean cases, the Mosaic GPU swiglu and
#               model cases; then the fused attention's warps at 64 rows and one stage at 256 again (~430 s)
#   warps28     session 28: compiled norm tests on 1-2 warps, then the step at 64 / 256 rows with the add + RMSNorm
#               kernel's program on 1 / 2 / 4 warps against 8 (~200 s)
#   swiglu28    session 28: compiled tests of SWIGLU_APPROX, then the step at 64 / 128 rows with it (~150 s)
#   tests28     session 28's defaults compiled: test_decode_attention.py's compiled and model cases (~250 s?)
#   lean28      session 28: the decode kernels' softmax with one ex2.approx.ftz an exponential (FTZ_EXP2) and
#               without the logit multiply and the select after the exponential (LEAN_SOFTMAX): compiled
#               tests, the step at 1 / 64 / 256 rows with each and both, the bandwidth sweep (~450 s)
#   mix28       session 28: Nsight Compute on the fused attention at 64 and 256 rows x 192 keys (the engine's
#               defaults), its warp instructions executed by SASS opcode (bench/ncu_hotspots.py --opcodes) and
#               its stall hotspots: where the ~2,000 instructions a warp go (~120 s)
#   short27     session 27: the 64-row step with its short tables split in two + the merge launch (split_short)
#               against the single pass, re-measured since early gathers and one-stage attention (~100 s)
#   reduce25    session 24, for the next session: which computation is the 7.5 µs `input_reduce_fusion` of the
#               64-row greedy step (bench/results/kernel_notes.md, session 24): the step's optimized HLO dumped
#               and the fusion printed (~120 s)
#   headwide    session 23, written after the device time was spent: the greedy head past 64 rows (all rows
#               a program): compiled tests, bench/lm_head.py at 128 / 256, the step at 128 / 256 rows with the
#               head (greedy_head256) and with XLA's argmax for the pick (xla_pick) against the default (~550 s)
#   acc2        session 20 (written after the device was withdrawn; run in session 21), ACCUMULATE on: compiled
#               Mosaic GPU and norm tests (the read-only exit wait and the seed's own programs included), then the step at
#               64/128 rows against partial sums, with each of those two, and with fewer K splits for the
#               accumulating products (~400 s)
#   ncu64       session 16: Nsight Compute on batch 64's projections and norm (bench/ncu_probe.py case gemm_b64:
#               the tensor-core skinny matmul for QKV / o / gate_up / down, add_rms_norm) (~60 s?)
#   mgpu        session 16: the 8-64-row projections on Mosaic GPU (jaxserve_kernels.skinny_matmul_mgpu, TMA + WGMMA):
#               its compiled tests and the model's step through it, then the decode step at 64 against the
#               Triton default over its tilings, and at 16 (~400 s)
#   mgpu2       session 16, after mgpu: Nsight Compute on the Mosaic GPU projections at 64 rows (default tiles and
#               32-row partials), then the decode step at 64 over tilings around call 2's best (~300 s)
#   mgpu3       session 16, Mosaic GPU tiles now 32 rows x 4 slots: compiled tests (the QKV's in-kernel bias is
#               new), the decode step at 64 around those tiles and with the QKV unsplit, the attention at
#               8 warps, then 32 and 16 rows against Triton (~450 s)
#   mgpu4       session 16, Mosaic GPU the default at 32-64 rows: compiled tests, then at 64 rows steps of two
#               64-wide boxes, and the fused attention's pages an iteration / splits, against Triton (~300 s)
#   attn256     session 16: batch 256's fused attention (14.2 µs a layer, the step's biggest item) gathering
#               all 16 pages of a short table in one iteration, at 2 / 4 / 8 warps, 2 stages (~150 s)
#   attnst      session 16, after attn256 (2 stages -9% at 256): the fused attention's pipeline stages at 64 and
#               256 rows (~120 s)
#   wide        session 17: steps of 65-256 rows through the fused glue with their projections on Mosaic GPU
#               (jaxserve_kernels.skinny_matmul_mgpu's WIDE_TILES) instead of cuBLAS: compiled tests, then the decode step
#               at 256 over tilings, profiled (~140 s)
#   wide2       session 17, after wide (row blocks of 64 best, 1.424 vs cuBLAS 1.335 ms): around it at 256, and
#               at 128 rows, each projection named in the profile (~100 s)
#   wide3       session 17, 65-128-row steps on Mosaic GPU by default (model.MGPU_MAX_ROWS): compiled tests, then
#               the decode step at 128 against cuBLAS and around the default tiles (~90 s)
#   wide4       session 17, down_proj's "deep" tile: compiled tests, the decode step at 128 (against cuBLAS and the
#               tiles before "deep") and at 64 (the deep tile there too), then throughput at 1/64/128/256 (~450 s)
#   final17     session 17's last call: the compiled kernel tests with the Mosaic GPU decode kernel's (jax 0.11's
#               ref.transpose / load forms), then the decode step at 64 and 128 (~450 s)
#   ws          session 17, run in session 18 (written after its GPU time): the warp-specialized projections (two
#               compute warpgroups a CTA; skinny_matmul_mgpu warpgroups=2): compiled tests, then the decode step at 256
#               against cuBLAS and the one-warpgroup kernel, and at 128 (~400 s)
#   timeline    session 18: bench/engine_timeline.py, one traced engine run at batch 256 and 64: the GPU's idle gaps
#               by the host phase open when each began, the host's phases untraced (~150 s)
#   engine18    session 18, the first decode call chained on the last prefill: throughput (8 steps a call, as
#               the throughput part plus batch 128), then 16 steps at 64 / 256, then the batch-256 timeline (~420 s)
#   xgu         session 18: the decode step at 256 with QKV, o and down on Mosaic GPU and gate_up + SwiGLU on
#               cuBLAS + XLA (model.XLA_GATE_UP_ROWS) against cuBLAS and the all-Mosaic-GPU route (~130 s)
#   xgu2        session 18, after xgu: that route's compiled model test, its step at 256 with cuBLAS's gate_up (the
#               wide compile's options) against cuBLAS, then throughput at 256 with the route off / on (~300 s)
#   steps16     session 18: bench/throughput.py at batch 64 / 256 with 16 decode steps a call (engine only; ~100 s)
#   pending     session 9's engine options against the default, one process per batch set: 8-warp norms (1/64,
#               the default since), the skinny matmul at batch 256 instead of cuBLAS, and per projection against
#               cuBLAS (bench/skinny_tune.py) (~300 s). Session 9's early gather was timed here too (no gain at
#               1/64, +1.8% at 256) and removed in session 11
#   pick        session 10: the greedy pick kernel (compiled tests, its tiling against XLA's reductions, the
#               decode step with it vs XLA's at batch 1/64/256; ~250 s) and, with PICK_PREFILL=1, prefill with
#               cuBLAS vs XLA's GEMMs (bench/prefill_step.py, ~60 s)
#   ab          the decode step at AB_BATCHES (default 1 64 256) with the kernels of AB_BASE against this tree's,
#               in alternating processes (base, new, base, new): for kernel changes with no switch to flip in
#               one process. Make the base with `mkdir ab_base && git archive <rev> kernels | tar -x -C ab_base`
#               (untracked, so it travels to the device; AB_BASE=ab_base). ~45 s a process
#   policies    the three scheduling policies, open loop, bf16 then float32 (~210 s each; compile cache shared;
#               POLICY_DTYPES=float32 for one of them, with POLICY_TIMEOUT=560: in session 9 250 s ran
#               none of its policies, 400 s one of three; POLICY_ARGS="--no-warmup" compiles only the shapes used:
#               143 s for all three in session 10). Session 10's float32 run differed in 1 request of 96; to
#               see whether TF32 GEMMs explain it, prefix JAX_DEFAULT_MATMUL_PRECISION=highest)
#   pad39       session 39: small decode calls padded to 8 rows (model.PAD_SMALL_DECODE) through the engine on the
#               GPU at 1.5B / 7B / 14B, then the steps it picks between (~560 s)
#   pad39b      session 39: bench/throughput.py --shape 1.5B at batch 1 / 2 / 4 with the padding off and on (~500 s?)
#   pad40       session 40: pad39b again with the engine padding past max_running, at 1.5B and 0.5B (~350 s)
#   padlong     session 40: padding off / on over 16k-key contexts (1.5B batch 1, 0.5B batch 2) (~300 s?)
#   engine      the GPU-marked engine tests of tests/test_qwen_shapes.py alone (~220 s)
#   livepad     session 40: model.PAD_LIVE_ROWS (a padded call's attention over its real rows only, always):
#               the compiled kernel test and the GPU engine tests with it on (~200 s)
#   livepad_e2e after livepad: end to end, live rows off / on, 1.5B batch 1 and 0.5B batch 2, 16k and 128-token
#               prompts, 8 processes (~370 s)
#   live41      session 41: live rows only where padding would cut the splits, now the default: the GPU engine tests,
#               then 1.5B batch 1 at 128 / 4k / 16k-token prompts and 0.5B batch 2 at 128, and 4k with it off (~435 s)
#   final41     session 41: throughput run 44's command (the issue-8 headline) at the session's last commit (~150 s?)
#   floor42     session 42: bench/kernel_floor.py, µs a kernel of a dependent chain of XLA matrix-vector products by the MB
#               each streams, and its fixed cost (~90 s)
#   floor42b    session 42: its Pallas chain alone, with no slicing kernel between two (~50 s)
#   kv42        session 42: the one-row QKV reading the attention's KV pages ahead of it (model.PREFETCH_KV): compiled
#               tests, then the batch-1 step with it off / on at 192 and 64 keys, profiled (~250 s)
#   kv42b       session 42: the same with the page reads in programs of their own past the projection's, 192 keys (~150 s)
#   kv42c       session 42: PREFETCH_KV the default: the batch-1 step against it off at 192 and 64 keys, 9 rounds (~170 s)
#   pdl44       whether XLA launches a Pallas Triton kernel that waits on
#               `griddepcontrol` programmatically: kernel_floor's stream chain with and without it (~60 s) (session 44: no; decode_step.md)
#   loop44      session 44: whether a fixed grid looping over blocks (kernel_floor --loop) streams a dependent chain's
#               bytes faster than the one-shot grid of 16 KiB programs (~400 s; session 44: no, decode_step.md)
#   struct45    session 45: structured outputs: the engine's constrained-request tests compiled, then bench/structured.py
#               (unconstrained vs regex vs JSON schema at batch 1/64/256, a 151k-token byte-level vocabulary) (~310 s;
#               session 45: 7 passed, regex rows at 86% / 89% of unconstrained tokens/s at 64 / 256 rows, structured.md)
#   mixes46     session 46: the guide pool on the GPU: test_guide_pool + the engine's constrained tests compiled, then
#               bench/structured.py --mixes 8 at batch 64 (0.5B shape, 151k vocabulary): each round's wall time and
#               the guided decode shapes compiled (one a pool size; before the pool, one a size of a mix's tables);
#               run the same at 4f20920 for the before (~300 s). Run session 67 (H100): one shape over 16 rounds; the
#               tests alone took 237 s (18 passed), so their limit is 300 s now (~360 s in all)
#   masked46    session 46: the masked greedy pick (allowed-token masks read inside jaxserve_kernels.greedy_pick):
#               its compiled kernel tests, then bench/structured.py at 64 / 256 rows with JAXSERVE_MASKED_PICK=0 and
#               =1, each its own process (regex rows' tokens/s against unconstrained: 86% / 89% in session 45's
#               run 4 with the XLA select + argmax); flip runner.MASKED_PICK's default if =1 wins (~420 s). Run
#               session 54 and 66 (03:34 UTC, H100, tree 4e2c020, one timed run a row: json's rows moved 2x between
#               runs of the same setting); since 5b02300 structured.py's rows are medians of 5 timed runs (~240 s).
#               Session 67 (H100, medians of 5, without the tests): no clear win (64-row regex 0.88x, json 1.05-1.10x
#               inside overlapping ranges); MASKED_PICK stays off (bench/results/structured.md)
#   dp46        session 46, on a 2-GPU machine (run's kind nvidia-h200-x2): data-parallel replicas, one engine
#               against jaxserve.Replicas over both GPUs driven by one host thread, 1024 requests of 128 + 128
#               tokens at 256 rows a replica, then with a shared prefix (bench/replicas.py; ~300 s)
#   spec47      session 47: n-gram speculative decoding, bench/speculative.py's repeat workload (0.5B shape,
#               prompts a random block twice and begun again) at batch 1 / 8 / 64 with k = 0 / 4 / 8 (session 48: the
#               tests and three workloads in one part ran past 520 s and gave nothing; the greedy-equality test fails
#               in bf16 on near-ties, speculative.md). spec47b: the embedded model's Python workload at batch 1 / 8.
#               Keep speculation off by default unless it wins
#   lora48      session 48: LoRA serving: bench/lora.py on the 0.5B shape at batch 1 / 64 / 256 (base engine, an engine
#               serving 4 adapters with base rows, one adapter, 4 adapters spread) and adapter rows against the
#               merged weights (~300 s?)
#   embed49     session 49: embeddings (jaxserve.pooling) against plain prefill of the same prompts, 0.5B shape, batch
#               64 / 256 x 128 / 512 tokens (bench/embed.py; ~200 s?)
#   tp50        session 50, on a 2-GPU machine (run's kind nvidia-h100-x2 / nvidia-h200-x2): tensor parallelism, the 7B
#               shape over 1 and 2 GPUs at batch 1 / 64 (output tok/s, ms a decode step, whether tp 2 gives tp 1's
#               greedy tokens; bench/tensor_parallel.py), then the tests of tests/test_tensor_parallel.py (~300 s?)
#   fp8_50      session 50: fp8 projection weights (EngineConfig(quantization="fp8"), XLA products of the upcast weights,
#               no skinny kernel) against bf16 on the 7B shape at batch 1 / 64 / 256 (bench/tensor_parallel.py; ~300 s?)
#   fp8_51      session 51: fp8 projections through the skinny matmul (float8 weights read as stored, widened in
#               registers; model.FP8_SKINNY): its compiled kernel tests, then bench/tensor_parallel.py on the 7B shape at
#               batch 1 / 64, bf16 against fp8 with the kernel (JAXSERVE_FP8_SKINNY=1), then fp8 with XLA's product of the
#               upcast weights (=0), each its own process (~450 s?). Run in session 51 on an H100: the compiled test
#               failed (a masked float8 load's int fill; fixed since in skinny_matmul._load_weights, not yet rerun), the
#               =0 rows gave bench/results/quantization.md. Flip model.FP8_SKINNY's default only if =1 wins.
#   yarn44      session 44: the 0.5B and 7B decode steps of a YaRN checkpoint (scaled cos/sin tables) compiled
#               against the reference at 1-256 rows (~200 s)
#   h100_52     session 52, on an H100 (issue 6's and 8's device; every default was tuned on the H200): the decode
#               kernel's knobs around the defaults at the four shapes short of issue 6 (bandwidth.py's "h100" sweep
#               sets, with the baselines), then the engine's step at 1 and 256 rows over glue settings that lost or tied
#               on the H200 (~520 s)
#   long52      session 52: three pipeline stages for long decode loops at head_dim 128 (LONG_LOOP_BLOCKS): its
#               compiled test, two stages beside it at every shape it changes, then the full bandwidth table (~500 s)
#   ranks68     session 68: sampled tokens' vocabulary ranks (SampleOutput.ranks): the greedy pick's and the sampler's
#               compiled tests with log-probabilities, the LLM / speculative / engine log-probability tests on the GPU,
#               then bench/logprob_cost.py (what log-probabilities and their ranks cost a step at 1 / 64 / 256 rows) (~400 s?)
#   sampler68   session 68: the LLM log-probability test that failed in ranks68 on a 1e-6 difference (now 1e-5), then
#               bench/sampler_cost.py: the sampler by setting (greedy, temperature, top-p, top-k, min-p) and top-k
#               selection (lax.top_k against two stages) at 1 / 64 / 256 rows (~400 s?)
#   chunks68    session 68: top-k / top-p cut-offs from the chunks with the largest maxima (sampling.CANDIDATE_CHUNKS)
#               against XLA's top-k of 1,024 (JAXSERVE_CANDIDATE_CHUNKS=0), bench/sampler_cost.py's sampler rows at 1 /
#               64 / 256 rows, each its own process; then test_sampling.py on the GPU (~450 s?)
#   chunks68b   session 68: chunks68 with top log-probabilities from the chunks too (sampling.top_k_exact), at 0 / 16 /
#               32 / 64 candidate chunks, each its own process; bench/logprob_cost.py; test_sampling.py (~400 s?)
#   chunks68c   session 68: the sampler's cut-offs as per-row floors (no [B, V] cond results written out), at 0 and 64
#               candidate chunks, each its own process, profiled per kernel at 256 rows; test_sampling + test_speculative
#               on the GPU (~400 s?)
#   chunks68d   session 68: candidate chunks of 128 / 64 / 32 tokens (JAXSERVE_CHUNK_TOKENS; 64 chunks each), the
#               top-p / top-k / top-5 log-probability rows at 64 / 256, each its own process; test_sampling (~350 s?)
#   noise68     session 68: the draw's Gumbel noise from a hash of (row key, token id) (sampling.HASH_NOISE) against
#               jax.random.gumbel's threefry, temp / top_p rows at 64 / 256, each its own process (~90 s)
#   stream69    session 69: the server streams a token a chunk since this session (--stream-interval 1, vLLM's);
#               bench/serving.py at 256 running requests arriving at once, interval 1 against 8 (the old
#               granularity), random 0.5B (~400 s?)
#   noise69     session 69: noise68's A/B with the top-k rows and a third arm, hash noise drawn over the vocabulary
#               (JAXSERVE_CANDIDATE_DRAW=0) against the candidates alone (the default under hash noise); then
#               test_sampling compiled under hash noise (~200 s?). Run in session 71 (first70): hash noise won, the
#               candidates-alone draw lost to it and is gone; noise_arms times threefry against hash noise now
#   first70     session 70 (no device came): noise69's three arms and a shorter stream69 in one call (~450 s), for a
#               session whose device time allows one call: sampler_cost.py's temp / top_p / top_k rows under threefry,
#               hash noise over the vocabulary and over the candidates, then serving.py at 256 running requests, a
#               token a chunk against 8 (384 requests of 128 + 128 tokens)
#   stream71    session 71: stream69 with a warm-up burst of 512 requests, as large as the measured run (stream69's
#               second run compiled step shapes inside its run; serving_stream_h100.md), each arm 135 s (~290 s)
#   steady71    session 71: stream71 on a pool full of the warm-up's cached prefixes (8,192 pages, the cache kept:
#               a long-running server's state, where each page a request grows into is evicted from the cache;
#               host_overhead.md session 71), to set beside stream71's fresh pool (~290 s)
#   proc72      session 72: stream71's workload with the engine in its own process (--engine-process) at stream
#               intervals 1 and 8, and the engine thread's at 1 beside them (each arm <= 170 s; ~450 s)
#   proc73a     session 72's follow-up: the engine's process against the thread at a token an event, each twice,
#               alternating, with the load generator over 4 processes (bench/serving.py --client-procs, auto), so
#               a compile inside one run has a twin without (each arm <= 150 s; ~450 s)
#   proc73b     the same at eight tokens an event (~400 s)
#   evict73     session 73: steady71's pool full of cached prefixes (8,192 pages, the warm-up's prefixes kept) with
#               the engine's process at eight tokens an event, the radix index's eviction as of 2b52de7 (a pass over
#               every node an evicted page) against the two-level minimum, alternating (each arm <= 140 s; ~400 s)
#   warm74      session 74: Engine.warmup with its compiles on 8 threads against one after the other (bench/warmup.py
#               --threads, the 0.5B shape at the serving buckets, greedy + sampling steps), each a fresh process, then
#               generate twice (compiles left, tokens/s); then proc73a's engine-process arm at a token an event with
#               the served engine at INFO (the step shapes the 512-request burst missed are logged; ~520 s)
#   api74       session 74: warm74's warm-up A/B on the greedy steps alone (both arms within the call), then proc73a's
#               engine-process arm at a token an event with --api-server-count 1 and 4 (each <= 140 s; ~480 s)
#   swarm74     session 74: the server's whole warm-up (--server-warmup: every step shape, log-probability variants
#               too) with its compiles on 8 threads (JAXSERVE_COMPILE_THREADS), session 73's call 3 that did not finish
#               its warm-up in 280 s one compile after another; then its measured run free of compiles (<= 400 s)
#   fp8test_52  session 52: the fp8 skinny matmul's compiled tests alone (fp8_51's first command; ~60 s?)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests bandwidth throughput)
export PYTHONPATH=.
# bench/lora.py once a setting, each its own process: lora_settings LIMIT "BENCH ARGS" "ENV ..." ... (the profile's
# base-model kernels left out of the log).
lora_settings() {
  local limit=$1 args=$2; shift 2
  for env in "$@"; do echo "== $env"
    env $env timeout "$limit" python3 bench/lora.py --shape 0.5B $args --no-check --profile /tmp/lp_settings 2>&1 \
      | grep -v "^WARNING\|^I0000\|^W0000\|Writing model" \
      | grep -v "^ .*µs/tok.*launches/tok.*\(skinny\|fused_decode\|nvjet\|greedy\|paged_att\|add_rms\|scatter\)"
    rm -rf /tmp/lp_settings
  done
}

# bench/lora.py with a knob on, then off, each its own process, its top kernels printed from a profile and its table
# in $OUT/<part>/on1 and on0: lora_ab VAR LIMIT TOP "BENCH ARGS" (--profile-batch among them picks the profiled rows).
lora_ab() {
  local var=$1 limit=$2 top=$3 args=$4
  for on in 1 0; do echo "== $var=$on"
    # shellcheck disable=SC2086  # the bench arguments are words
    env "$var=$on" timeout "$limit" python3 bench/lora.py --shape 0.5B $args --no-check --profile /tmp/lp_ab \
      --profile-top "$top" --out "$OUT/$part/on$on" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing"
    rm -rf /tmp/lp_ab
  done
}

# bench/lora.py in this tree, then in old_tree/ (a `git archive` of an earlier commit, untracked: the baseline in the
# same call) when it is there, each its own process, tables in $OUT/<part>/new and old: lora_trees LIMIT "BENCH ARGS"
# (a --profile among them goes to /tmp/lp_trees, emptied after each run).
lora_trees() {
  local limit=$1 args=$2 dir name
  for dir in . old_tree; do
    [ -d "$dir" ] || continue
    name=new; [ "$dir" = . ] || name=old
    echo "== $name ($dir)"
    # shellcheck disable=SC2086  # the bench arguments are words
    (cd "$dir" && timeout "$limit" python3 bench/lora.py --shape 0.5B $args --out "$OUT/$part/$name" 2>&1 \
      | grep -v "^WARNING\|^I0000\|^W0000\|Writing")
    rm -rf /tmp/lp_trees
  done
}

# Session 62's down_proj shrink (model.LORA_DOWN_SHRINK), with and without: its compiled tests, then bench/lora.py at
# the given batches, profiled at 64 rows: down_shrink_ab TEST_LIMIT LORA_LIMIT "BATCHES".
down_shrink_ab() {
  timeout "$1" python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
    tests/test_skinny_matmul_mgpu.py tests/test_residual_norm.py tests/test_lora.py \
    -k "lora_shrink_into or shrink_errors or pending or (float32_models_logits and mgpu)" 2>&1 | tail -5
  lora_ab JAXSERVE_LORA_DOWN_SHRINK "$2" 16 "--batch $3"
}

# The sampler's noise A/B (sessions 69-71), each arm its own process: threefry against hash noise (the default since
# session 71); temp / top_p / top_k rows at 64 / 256. noise_arms LIMIT.
noise_arms() {
  for h in 0 1; do echo "== ab JAXSERVE_HASH_NOISE=$h"
    JAXSERVE_HASH_NOISE=$h timeout "$1" python3 bench/sampler_cost.py --rows 64 256 --settings temp top_p top_k
  done
}

# The server's stream granularity A/B (sessions 69-70): bench/serving.py at 256 running requests arriving at once, a
# token a chunk against 8, random 0.5B. stream_ab LIMIT REQUESTS OUTPUT_LEN.
stream_ab() {
  # The device has no server stack: wheels fetched here (`pip download --only-binary=:all: --python-version 3.12
  # --platform manylinux2014_x86_64 -d .whl fastapi uvicorn prometheus-client httpx`) travel with `carry: [".whl"]`.
  if ! python3 -c "import fastapi, uvicorn, httpx" 2>/dev/null; then
    python3 -m pip install -q --no-index --find-links .whl fastapi uvicorn prometheus-client httpx || return 1
  fi
  local intervals=("${@:4}")
  [ ${#intervals[@]} -eq 0 ] && intervals=(1 8)
  for interval in "${intervals[@]}"; do echo "== ab stream_interval=$interval ${STREAM_AB_ARGS:-}"
    timeout "$1" python3 bench/serving.py --random-model qwen2.5-0.5b --model /tmp/q05 --num-requests "$2" \
      --rate inf --input-len 128 --output-len "$3" --max-running 256 --decode-steps 8 \
      --batch-buckets 1 8 64 256 --stream-interval $interval ${STREAM_AB_ARGS:---warmup 256 --no-engine-process}
  done
}

for part in "${parts[@]}"; do
  mkdir -p "$OUT/$part"
  start=$(date +%s)
  case $part in
    tests) timeout 380 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_split_combine.py tests/test_decode_attention.py \
             tests/test_skinny_matmul.py tests/test_residual_norm.py \
             tests/test_greedy_pick.py -k "compiled or model" ;;
    tests_kernels) timeout 450 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                     tests/test_kernels.py -k "compiled or model" ;;
    tests_mgpu) timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                  tests/test_skinny_matmul_mgpu.py tests/test_paged_attention_mgpu.py -k "compiled or model" ;;
    bandwidth) timeout 360 python3 bench/bandwidth.py --budget-s 300 --out "$OUT/$part" ;;
    throughput) timeout 240 python3 bench/throughput.py --no-static --batches 1 64 256 --long-prompt 1024 \
                  --long-batch 64 --decode-steps 8 --impls pallas --no-hf-compile --out "$OUT/$part" ;;
    hfcompile) timeout 240 python3 bench/throughput.py --batches 256 --long-prompt 0 --no-static \
                 --decode-steps 8 --impls pallas --hf-compile-batches 256 --out "$OUT/$part" ;;
    step) timeout 330 python3 bench/decode_step.py --batches 1 --variants default --glue kernels xla \
            --rounds 5 --reps 10 --out "$OUT/$part" ;;
    ncu) timeout 240 ncu --clock-control none -k regex:'paged|fused|combine|greedy' --section SpeedOfLight \
           --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
           --section SourceCounters -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py --calls 1 --cases ${NCU_CASES:-7b_64x2k fused_256x192} \
         && ncu -i "$OUT/$part/probe.ncu-rep" --page details ;;
    sweep) timeout 300 python3 bench/bandwidth.py --sweep-only --budget-s 235 --out "$OUT/$part" ;;
    mosaic) timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_paged_attention_mgpu.py -k compiled \
            && timeout 280 python3 bench/bandwidth.py --mosaic-only --budget-s 240 --out "$OUT/$part" ;;
    qkv) timeout 200 python3 bench/decode_step.py --batches 1 16 64 --variants default --no-static \
           --glue kernels qkv_unsplit qkv_unsplit_n32 qkv_split2 --rounds 5 --reps 10 ;;
    wideswiglu) timeout 130 python3 bench/skinny_tune.py --rows 256 128 --shapes gate_up --epilogue swiglu \
                  --block-m 64 128 --block-n 32 64 --block-k 64 128 --stages-warps 3x4 3x8 --targets 264 ;;
    sweep7b) timeout 200 python3 bench/bandwidth.py --sweep-only --budget-s 170 --out "$OUT/$part" \
               --sweep-configs "stages=3" "stages=4" "warps=8" "ppb=4 stages=4" ;;
    short) timeout 200 python3 bench/decode_step.py --batches 1 16 64 256 --variants default --no-static \
             --glue kernels split_short --rounds 5 --reps 10 ;;
    nk) timeout 90 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
          tests/test_skinny_matmul.py -k compiled
        timeout 300 python3 bench/decode_step.py --batches 1 16 64 --variants default --no-static \
          --glue kernels nk nk_n32 nk_k128 nk_k512 --rounds 5 --reps 10 --profile /tmp/nk --out "$OUT/$part"
        timeout 140 python3 bench/skinny_tune.py --rows 1 --layouts kn nk --block-n 16 32 64 --block-k 128 256 \
          --stages-warps 3x4 --targets 264 ;;
    gemv) timeout 90 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul.py -k "compiled and nk"
          timeout 220 python3 bench/decode_step.py --batches 1 --variants default --no-static \
            --glue kernels gemv gemv_n32 gemv_k512 gemv_n32_k128 nk_xla --rounds 5 --reps 10 --profile /tmp/gemv
          timeout 150 python3 bench/decode_step.py --batches 16 64 --variants default --no-static \
            --glue kernels nk_xla --rounds 5 --reps 10 --profile /tmp/gemv ;;
    gemv2) timeout 90 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul.py -k "compiled and nk"
           timeout 400 python3 bench/decode_step.py --batches 1 --variants default --no-static \
             --glue kernels gemv nk_xla nk_xla_glue gemv_n8_k1024 gemv_n4_k1024 gemv_n8_k1024_w8 \
             gemv_n16_k1024_w8 gemv_n8_k1024_t1k gemv_n8_k512_t1k --rounds 5 --reps 10 --profile /tmp/gemv2 ;;
    nkall) timeout 60 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul.py -k "compiled and nk"
           timeout 150 python3 bench/decode_step.py --batches 1 --variants default --no-static \
             --glue kernels nk nk_xla_glue gemv_n4 gemv_n16 gemv_t1k gemv_w16 gemv_k2048 --rounds 5 --reps 10 \
             --profile /tmp/nkall
           timeout 150 python3 bench/decode_step.py --batches 16 64 --variants default --no-static \
             --glue kernels nk nk_n32_k128 nk_n64 nk_mma_n16 --rounds 5 --reps 10
           timeout 80 python3 bench/decode_step.py --batches 256 --variants default --no-static \
             --glue kernels nk --rounds 5 --reps 10
           timeout 90 python3 bench/prefill_step.py --shapes 64x128 8x1024 --options cublas cublas_nk ;;
    fold) timeout 150 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul.py tests/test_decode_attention.py -k "compiled or model"
          timeout 100 python3 bench/decode_step.py --batches 1 --variants default --no-static \
            --glue kn kernels norm_fold --rounds 5 --reps 10 --profile /tmp/fold
          timeout 150 python3 bench/decode_step.py --batches 16 64 --variants default --no-static \
            --glue kn kernels nk_k256 --rounds 5 --reps 10 ;;
    fold2) timeout 110 python3 bench/decode_step.py --batches 1 --variants default --no-static \
             --glue kernels gemv_n4 gemv_n16 gemv_w16 no_norm_fold --rounds 5 --reps 10 --profile /tmp/fold2
           timeout 80 python3 bench/decode_step.py --batches 64 --variants default --no-static \
             --glue kn kernels nk_k64 --rounds 5 --reps 10 ;;
    fold3) timeout 120 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul.py -k "compiled and norm"
           timeout 330 python3 bench/decode_step.py --batches 1 --variants default --no-static --glue kernels \
             fold_sw_n4 fold_sw_n2 fold_sw_w16 fold_sw_n4_w4 fold_sw_n4_p264 fold_sw_n2_p264 fold_sw_n4_p528 \
             fold_sw_n2_p528 fold_sw_n4_p132 fold_qkv_n4 fold_n4 --rounds 5 --reps 10 --profile /tmp/fold3 ;;
    fold4) timeout 100 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul.py -k "compiled and k_loop"
           timeout 400 python3 bench/decode_step.py --batches 1 --variants default --no-static --glue kernels \
             fold_sw_n2_p528 fold_best fold_sw_n2_p792 fold_sw_n2_p1056 fold_sw_n1_p528 fold_sw_n1_p1056 \
             fold_sw_n4_p1056 fold_qkv_n2 fold_qkv_n2_p264 fold_qkv_n4_p144 down_pf down_t528 down_t1056 \
             down_n4_pf down_n4_pf_t528 down_n2_pf_t896 attn_w2 attn_w8 --rounds 5 --reps 10 --profile /tmp/fold4 ;;
    fold5) timeout 400 python3 bench/decode_step.py --batches 1 --variants default --no-static --glue kernels \
             fold_best b2 b2_sw_n2_w2_p528 b2_sw_n2_w2_p1056 b2_sw_n2_w4_p528 b2_sw_n4_w4_p528 b2_sw_n4_w4_p264 \
             b2_sw_n1_w1_p1056 b2_sw_n1_w2_p1056 b2_sw_n2_w4_p1056 b2_qkv_n4_w4 b2_qkv_n2_w2 b2_qkv_n2_w4 \
             b2_gemv_n4_w4 b2_gemv_n2_w2 b2_gemv_n8_w8 --rounds 5 --reps 10 --profile /tmp/fold5 ;;
    oattn) timeout 200 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_decode_attention.py -k "(compiled and decode_o) or model_decode_step"
           timeout 330 python3 bench/decode_step.py --batches 1 --variants default --no-static --glue kernels \
             o_attn o_attn_pf o_attn_r4 o_attn_r16 o_attn_r32 o_attn_r16_pf --rounds 5 --reps 10 \
             --profile /tmp/oattn ;;
    oattn2) timeout 300 python3 bench/decode_step.py --batches 1 --variants default --no-static --glue kernels \
              no_o_attn o_attn_r32_pf_w4 o_attn_r8_pf_w8 o_attn_r16_pf_w8 o_attn_r32_pf_w8 o_attn_r64_pf_w8 \
              --rounds 5 --reps 10 --profile /tmp/oattn2 ;;
    ncugemv) timeout 200 ncu --clock-control none -k regex:'skinny' --section SpeedOfLight --section Occupancy \
               --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
               --section InstructionStats --section SourceCounters \
               -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py --calls 1 --cases gemv_b1 \
             && ncu -i "$OUT/$part/probe.ncu-rep" --page details ;;
    prof64) timeout 300 python3 bench/decode_step.py --batches 64 256 --variants default --no-static --glue kernels \
              --rounds 3 --reps 10 --profile /tmp/prof64 ;;
    ncu64) timeout 200 ncu --clock-control none -k regex:'skinny|norm' --section SpeedOfLight --section Occupancy \
             --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
             -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py --calls 1 --cases gemm_b64 \
           && ncu -i "$OUT/$part/probe.ncu-rep" --page details ;;
    mgpu) timeout 150 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul_mgpu.py -k "compiled or model"
          timeout 330 python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
            mgpu mgpu_s4 mgpu_s8 mgpu_t132 mgpu_t528 mgpu_n32 mgpu_g16 --rounds 5 --reps 10 --profile /tmp/mgpu
          timeout 120 python3 bench/decode_step.py --batches 16 --variants default --no-static --glue kernels \
            mgpu --rounds 5 --reps 10 ;;
    mgpu2) timeout 150 ncu --clock-control none -k regex:'mosaic|skinny' --section SpeedOfLight --section Occupancy \
             --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
             -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py --calls 1 --cases mgpu_b64 mgpu_b64_n32 \
           && ncu -i "$OUT/$part/probe.ncu-rep" --page details > "$OUT/$part/ncu.txt"; \
           grep -E "^  [a-z_]+ \(|Duration|DRAM Throughput|L2 Cache Throughput|SM Active|Elapsed Cycles" "$OUT/$part/ncu.txt"
           timeout 380 python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
             mgpu_n32 mgpu_n32_s4 mgpu_n32_t132 mgpu_n32_s4_t132 mgpu_n32_s3 mgpu_n32_g64_s4 mgpu_n128_t132 \
             --rounds 5 --reps 10 --profile /tmp/mgpu2 ;;
    mgpu3) timeout 100 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul_mgpu.py -k "compiled or model"
           timeout 300 python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
             mgpu mgpu_qkv1 mgpu_s5 mgpu_gs3 mgpu_ps3 mgpu_t200 attn_w8 --rounds 5 --reps 10 --profile /tmp/mgpu3
           timeout 150 python3 bench/decode_step.py --batches 32 16 --variants default --no-static --glue kernels \
             mgpu --rounds 5 --reps 10 ;;
    mgpu4) timeout 100 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul_mgpu.py -k "compiled or model"
           timeout 400 python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
             skinny_triton mgpu_b2_s3 mgpu_b2_s2 mgpu_gb2_s3 attn_ppb16 attn_ppb4 attn_split2 --rounds 5 --reps 10 \
             --profile /tmp/mgpu4 ;;
    attn256) timeout 300 python3 bench/decode_step.py --batches 256 --variants default --no-static --glue kernels \
               attn_ppb16 attn_ppb16_w8 attn_ppb16_w2 attn_w8 attn_st2 --rounds 5 --reps 10 --profile /tmp/attn256 ;;
    attnst) timeout 300 python3 bench/decode_step.py --batches 64 256 --variants default --no-static --glue kernels \
              attn_st2 attn_st3 --rounds 5 --reps 10 --profile /tmp/attnst ;;
    wide) timeout 120 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul_mgpu.py -k "compiled or model"
          timeout 420 python3 bench/decode_step.py --batches 256 --variants default --no-static --glue kernels \
            mgpu256 mgpu256_n64 mgpu256_bm128 mgpu256_bm128_n64 mgpu256_t132 mgpu256_g16 mgpu256_bm64 \
            --rounds 3 --reps 10 --profile /tmp/wide ;;
    wide2) timeout 300 python3 bench/decode_step.py --batches 256 --variants default --no-static --glue kernels \
             mgpu256_bm64 mgpu256_bm64_n32 mgpu256_bm64_t132 mgpu256_bm64_n128 mgpu256_bm64_s6 mgpu256_bm64_g128 \
             --rounds 3 --reps 10 --profile /tmp/wide2
           timeout 200 python3 bench/decode_step.py --batches 128 --variants default --no-static --glue kernels \
             mgpu256 mgpu256_bm64 mgpu256_bm128 mgpu256_bm64_n32 --rounds 3 --reps 10 --profile /tmp/wide2b ;;
    wide3) timeout 150 python3 -m pytest -q -x --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul_mgpu.py -k "compiled or model"
           timeout 400 python3 bench/decode_step.py --batches 128 --variants default --no-static --glue kernels \
             cublas128 mgpu256_g1 mgpu256_g1_s6 mgpu256_g1_n64s6 mgpu256_s6 --rounds 5 --reps 10 --profile /tmp/wide3 ;;
    wide4) timeout 120 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul_mgpu.py -k "compiled or model or tiles"
           timeout 150 python3 bench/decode_step.py --batches 128 --variants default --no-static --glue kernels \
             cublas128 mgpu256_nodeep --rounds 5 --reps 10 --profile /tmp/wide4
           timeout 120 python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
             mgpu_deep --rounds 5 --reps 10 --profile /tmp/wide4b
           timeout 260 python3 bench/throughput.py --no-static --batches 1 64 128 256 --long-prompt 1024 \
             --long-batch 64 --decode-steps 8 --impls pallas --no-hf-compile --out "$OUT/$part/throughput" ;;
    final17) timeout 400 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_kernels.py tests/test_split_combine.py tests/test_decode_attention.py \
               tests/test_skinny_matmul.py tests/test_skinny_matmul_mgpu.py tests/test_residual_norm.py \
               tests/test_greedy_pick.py tests/test_paged_attention_mgpu.py -k "compiled or model"
             timeout 140 python3 bench/decode_step.py --batches 64 128 --variants default --no-static --glue kernels \
               --rounds 3 --reps 10 ;;
    ws) timeout 100 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
          tests/test_skinny_matmul_mgpu.py -k "two_warpgroup and compiled"
        timeout 360 python3 bench/decode_step.py --batches 256 --variants default --no-static --glue kernels \
          mgpu256_bm64 mgpu256_ws128 mgpu256_ws128_n64 mgpu256_ws256 mgpu256_ws_g mgpu256_ws_g_s2 mgpu256_ws_g256 \
          mgpu256_ws_g256_s2 --rounds 3 --reps 10 --profile /tmp/ws
        timeout 120 python3 bench/decode_step.py --batches 128 --variants default --no-static --glue kernels \
          mgpu256_ws128 mgpu256_ws_g --rounds 3 --reps 10 --profile /tmp/ws128 ;;
    timeline) timeout 150 python3 bench/engine_timeline.py --batch 256 --cprofile 40 --out "$OUT/$part/b256"
              timeout 90 python3 bench/engine_timeline.py --batch 64 --cprofile 25 --out "$OUT/$part/b64" ;;
    steps16) timeout 200 python3 bench/throughput.py --no-static --batches 64 256 --long-prompt 0 --decode-steps 16 \
               --impls pallas --no-hf --out "$OUT/$part" ;;
    engine18) timeout 260 python3 bench/throughput.py --no-static --batches 1 64 128 256 --long-prompt 1024 \
                --long-batch 64 --decode-steps 8 --impls pallas --no-hf-compile --out "$OUT/$part/steps8"
              timeout 120 python3 bench/throughput.py --no-static --batches 64 256 --long-prompt 0 --decode-steps 16 \
                --impls pallas --no-hf --out "$OUT/$part/steps16"
              timeout 120 python3 bench/engine_timeline.py --batch 256 --out "$OUT/$part/timeline" ;;
    xgu) timeout 150 python3 bench/decode_step.py --batches 256 --variants default --no-static --glue kernels \
           mgpu256_bm64 mgpu256_xgu mgpu256_xgu_deep --rounds 3 --reps 10 --profile /tmp/xgu ;;
    xgu2) timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul_mgpu.py -k "model_step_with_gate_up or 128_row"
          timeout 120 python3 bench/decode_step.py --batches 256 --variants default --no-static --glue kernels \
            mgpu256_xgu mgpu256_xgu_wt --rounds 5 --reps 10
          for rows in 128 256; do  # old default (128), then the xgu route for 129-256 rows (256)
            JAXSERVE_MGPU_MAX_ROWS=$rows JAXSERVE_XLA_GATE_UP_ROWS=128 timeout 100 python3 bench/throughput.py \
              --no-static --batches 256 --long-prompt 0 --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part/mgpu$rows"
          done ;;
    pending) timeout 180 python3 bench/decode_step.py --batches 1 64 --variants default --no-static \
               --glue kernels norm_warps8 --rounds 5 --reps 10
             timeout 200 python3 bench/decode_step.py --batches 256 --variants default --no-static \
               --glue kernels skinny256 --rounds 5 --reps 10 --profile /tmp/pending
             timeout 150 python3 bench/skinny_tune.py --rows 256 --block-n 64 --block-k 64 128 \
               --stages-warps 3x4 4x4 --targets 264 528 ;;
    pick) timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_greedy_pick.py -k compiled
          timeout 150 python3 bench/greedy_pick_tune.py --batches 1 64 256 --out "$OUT/$part"
          timeout 200 python3 bench/decode_step.py --batches 1 64 256 --variants default --no-static \
            --glue kernels xla_pick --rounds 5 --reps 10
          [ -n "${PICK_PREFILL:-}" ] && timeout 120 python3 bench/prefill_step.py --shapes 64x128 8x1024 \
            --options default cublas --out "$OUT/$part" ;;
    ab) for round in 1 2; do
          for side in base new; do
            path=.; [ $side = base ] && path=${AB_BASE:?set AB_BASE to the base kernels folder}:.
            echo "== ab round $round: $side"
            PYTHONPATH=$path timeout 150 python3 bench/decode_step.py --batches ${AB_BATCHES:-1 64 256} \
              --variants default --no-static --glue kernels --rounds 3 --reps 10
          done
        done ;;
    policies) export JAX_COMPILATION_CACHE_DIR=/tmp/jaxserve_jc JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
              for dtype in ${POLICY_DTYPES:-bfloat16 float32}; do
                timeout ${POLICY_TIMEOUT:-250} python3 bench/throughput.py --policies --num-requests 96 --rate 64 --max-running 16 \
                  --prompt-len 256 --output-len 32 --decode-steps 4 --dtype $dtype --out "$OUT/$part/$dtype" \
                  ${POLICY_ARGS:-}
              done ;;
    pdl) timeout 150 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
           tests/test_skinny_matmul_mgpu.py -k "pdl or through_mgpu_matches_triton"
         timeout 260 python3 bench/decode_step.py --batches 64 128 --variants default --no-static --glue kernels pdl \
           --rounds 5 --reps 10 --profile /tmp/pdl
         timeout 130 python3 bench/decode_step.py --batches 64 --variants nopdl --no-static --glue kernels pdl \
           --rounds 3 --reps 10 --profile /tmp/nopdl ;;
    ncu19) timeout 200 ncu --clock-control none -k regex:'skinny_mgpu|paged|fused' --section SpeedOfLight \
             --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
             --section SourceCounters -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py --calls 1 \
             --cases mgpu_b64 05b_64x2k fused_64x192
           ncu -i "$OUT/$part/probe.ncu-rep" --page details > "$OUT/$part/details.txt"
           grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|SM Active|Elapsed Cycles|Achieved Occ|Registers Per|Grid Size|Warp Cycles Per Issued" \
             "$OUT/$part/details.txt"
           python3 bench/ncu_hotspots.py "$OUT/$part/probe.ncu-rep" --top 15
           timeout 250 python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
             mgpu_gs5 mgpu_gs6 mgpu_gb2_s3 --rounds 5 --reps 10 --profile /tmp/gs ;;
    gb2) timeout 330 python3 bench/decode_step.py --batches 32 64 128 --variants default --no-static --glue kernels \
           mgpu_gb2_s3 mgpu256_gb2 --rounds 7 --reps 10 --profile /tmp/gb2 ;;
    downb2) timeout 200 python3 bench/decode_step.py --batches 32 64 --variants default --no-static --glue kernels \
              mgpu_deep_b2 mgpu_pb2 --rounds 7 --reps 10 --profile /tmp/downb2 ;;
    final19) timeout 120 python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
               mgpu_deep_b1 --rounds 7 --reps 10 --profile /tmp/final19
             timeout 280 python3 bench/throughput.py --no-static --batches 1 64 128 256 --long-prompt 1024 \
               --long-batch 64 --decode-steps 8 --impls pallas --no-hf-compile --out "$OUT/$part/throughput" ;;
    wideb2) timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_skinny_matmul_mgpu.py -k "compiled and 4864"
            timeout 200 python3 bench/decode_step.py --batches 128 --variants default --no-static --glue kernels \
              mgpu256_deep_b2 mgpu256_pb2 --rounds 7 --reps 10 --profile /tmp/wideb2 ;;
    gwidth) timeout 150 python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
              mgpu_g16_s4 mgpu_g64_b2 --rounds 7 --reps 10 --profile /tmp/gwidth ;;
    acc) timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
           tests/test_skinny_matmul_mgpu.py tests/test_residual_norm.py tests/test_decode_attention.py \
           -k "accumulat or float32_stream or float32_accumulator" \
         && timeout 330 python3 bench/decode_step.py --batches 32 64 128 --variants default --no-static --glue \
              kernels accumulate --rounds 7 --reps 10 --profile /tmp/acc ;;
    acc256) timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_skinny_matmul_mgpu.py -k "gate_up_on_xla" ; \
            timeout 300 python3 bench/decode_step.py --batches 256 --variants default --no-static --glue \
              kernels mgpu256_xgu mgpu256_xgu_partials --rounds 7 --reps 10 --profile /tmp/acc256 ;;
    acc16) timeout 300 python3 bench/decode_step.py --batches 8 16 24 --variants default --no-static --glue \
             kernels mgpu_min8 --rounds 7 --reps 10 --profile /tmp/acc16 ;;
    acc2) timeout 230 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul_mgpu.py tests/test_residual_norm.py -k "compiled or model" ; \
          timeout 330 python3 bench/decode_step.py --batches 64 128 --variants default --no-static --glue \
              kernels no_accumulate exit_read_only seed_programs mgpu_p132 mgpu_deep_t132 --rounds 7 --reps 10 \
              --profile /tmp/acc2 ;;
    final21) timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_skinny_matmul_mgpu.py -k "256 and (compiled or model)" ; \
             timeout 150 python3 bench/decode_step.py --batches 128 --variants default --no-static \
               --glue kernels xgu64 --rounds 7 --reps 10 --profile /tmp/final21 ; \
             timeout 150 python3 bench/throughput.py --no-static --batches 128 --long-prompt 0 --decode-steps 8 \
               --impls pallas --no-hf-compile --out "$OUT/$part" ;;
    defaults21) timeout 400 python3 bench/decode_step.py --batches 8 16 24 64 128 256 --variants default --no-static \
                  --glue kernels before21 --rounds 7 --reps 10 ;;
    pages22) timeout 330 python3 bench/bandwidth.py --page-sweep --budget-s 280 --out "$OUT/$part" ;;
    gen22) timeout 200 python3 bench/warmup.py --generate-twice --prompts 8 --max-tokens 32 ;;
    pdl22) timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul_mgpu.py -k "(pdl or accumulat) and (compiled or model)" ; \
           timeout 380 python3 bench/decode_step.py --batches 64 128 --variants default nographs --no-static \
             --glue kernels pdl --rounds 5 --reps 10 --profile /tmp/pdl22 ;;
    head23) timeout 150 python3 -m pytest -x -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_skinny_matmul_mgpu.py -k "argmax and compiled" ; \
            timeout 400 python3 bench/lm_head.py --rows 64 128 256 ;;
    head23b) timeout 200 python3 -m pytest -x -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_skinny_matmul_mgpu.py tests/test_engine.py -k "(argmax and compiled) or greedy_tokens" ; \
             timeout 300 python3 bench/decode_step.py --batches 32 64 --variants default --no-static \
               --glue kernels greedy_head --rounds 7 --reps 10 --profile /tmp/head23b ;;
    sweep24) timeout 100 python3 bench/bandwidth.py --sweep-only --budget-s 80 --sweep-configs warps=8 warps=2 \
               stages=1 stages=3 "splits=8 warps=8" "splits=8 stages=3" ;;
    early25) timeout 150 python3 -m pytest -x -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_decode_attention.py -k "early_gather and compiled" ; \
              timeout 330 python3 bench/decode_step.py --batches 1 64 256 --variants default --no-static \
                --glue kernels early_gather --rounds 7 --reps 10 --profile /tmp/early25 ;;
    merge25) timeout 150 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_greedy_pick.py tests/test_skinny_matmul_mgpu.py tests/test_decode_attention.py \
                -k "compiled and (pick_blocks or argmax or early_gather)" ; \
              timeout 200 python3 bench/decode_step.py --batches 64 --variants default --no-static \
                --glue kernels argmax_merge no_early_gather --rounds 7 --reps 10 --profile /tmp/merge25 ; \
              timeout 220 python3 bench/decode_step.py --batches 128 256 --variants default --no-static \
                --glue kernels attn_st1 --rounds 7 --reps 10 --profile /tmp/merge25b ;;
    warps25) timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_greedy_pick.py tests/test_skinny_matmul_mgpu.py tests/test_decode_attention.py \
                -k "compiled and (pick_blocks or argmax or early_gather or model)" ; \
              timeout 260 python3 bench/decode_step.py --batches 64 128 256 --variants default --no-static \
                --glue kernels attn_w8 --rounds 7 --reps 10 --profile /tmp/warps25 ;;
    ppb25) timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_decode_attention.py -k model ; \
              timeout 200 python3 bench/decode_step.py --batches 64 128 --variants default --no-static \
                --glue kernels attn_ppb16 attn_ppb16_w8 --rounds 7 --reps 10 --profile /tmp/ppb25 ;;
    scale25) timeout 60 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_residual_norm.py -k "compiled and scale_loaded" ; \
              timeout 150 python3 bench/decode_step.py --batches 64 --variants default --no-static \
                --glue kernels norm_scale_first --rounds 5 --reps 10 --profile /tmp/scale25 ;;
    hoist26) timeout 60 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_skinny_matmul.py -k "compiled and hoisted" ; \
              timeout 150 python3 bench/decode_step.py --batches 1 --variants default --no-static \
                --glue kernels gemv_hoist --rounds 7 --reps 10 --profile /tmp/hoist26 ;;
    combine26) timeout 60 python3 -m pytest -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_split_combine.py -k compiled ; \
              timeout 120 python3 bench/decode_step.py --batches 64 --context 1088 --variants default --no-static \
                --glue kernels early_partials --rounds 7 --reps 10 --profile /tmp/combine26 ; \
              for on in 0 1; do JAXSERVE_EARLY_PARTIALS=$on timeout 50 python3 bench/bandwidth.py --sweep-only \
                --budget-s 40 --sweep-configs splits=128; done ;;
    early26) timeout 330 python3 bench/decode_step.py --batches 1 64 128 --variants default --no-static \
               --glue kernels rope_concat --rounds 7 --reps 10 --profile /tmp/early26 ;;
    pick29) timeout 200 python3 bench/greedy_pick_tune.py --batches 256 128 --argmax-only --blocks 4096 8192 \
              --warps 4 8 --stages 2 3 4 --targets 528 1056 --out "$OUT/$part" ;;
    kernels29) timeout 330 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                 tests/test_kernels.py -k "compiled and not (decode or lean)" ;;
    g30) timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
           tests/test_skinny_matmul_mgpu.py -k "compiled and swiglu" ; \
         timeout 300 python3 bench/decode_step.py --batches 64 --variants default --no-static \
           --glue kernels mgpu_g24 mgpu_g40 mgpu_g48 mgpu_g40_s4 --rounds 7 --reps 10 --profile /tmp/g30 ;;
    bal30) timeout 240 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul_mgpu.py -k "compiled and (swiglu or balanced or accumulat)" ; \
           timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul_mgpu.py -k "model and not compiled" ; \
           timeout 300 python3 bench/decode_step.py --batches 64 --variants default --no-static \
             --glue kernels mgpu_g32 balanced balanced_p132 balanced_p396 head_b120 head_b112 mgpu_p528 \
             --rounds 7 --reps 10 --profile /tmp/bal30a ; \
           timeout 200 python3 bench/decode_step.py --batches 256 --variants default --no-static \
             --glue kernels balanced balanced_p132 balanced_p396 --rounds 7 --reps 10 --profile /tmp/bal30b ;;
    more30) timeout 150 python3 bench/decode_step.py --batches 64 --variants default --no-static \
              --glue kernels head_b192 head_b256 mgpu_deep_n56 mgpu_deep_n56_t264 --rounds 7 --reps 10 --profile /tmp/more30a \
              --dump-hlo "$OUT/$part/hlo" ; \
            timeout 120 python3 bench/decode_step.py --batches 128 --variants default --no-static \
              --glue kernels mgpu256_g40 --rounds 7 --reps 10 --profile /tmp/more30b ;;
    final30) timeout 150 python3 bench/throughput.py --no-static --batches 1 64 256 --long-prompt 1024 \
               --long-batch 64 --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part/default" ; \
             timeout 200 python3 bench/decode_step.py --batches 64 256 --variants default --no-static \
               --glue kernels unroll2 unroll8 --rounds 7 --reps 10 --profile /tmp/final30 ; \
             JAXSERVE_DECODE_UNROLL=8 timeout 150 python3 bench/throughput.py --no-static --batches 1 64 256 \
               --long-prompt 1024 --long-batch 64 --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part/unroll8" ; \
             timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_skinny_matmul_mgpu.py -k "(compiled and swiglu) or 128_row" ;;
    head30) timeout 150 python3 bench/lm_head.py --rows 64 --tiles 128x4x1 112x4x1 120x4x1 136x4x1 144x4x1 \
              128x3x2 192x3x1 256x3x1 --rounds 7 ;;
    sass30) timeout 200 ncu --clock-control none -k regex:'skinny_mgpu' --section SpeedOfLight \
              --section SourceCounters -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py --calls 1 \
              --cases mgpu_b64 ; \
            python3 bench/ncu_hotspots.py "$OUT/$part/probe.ncu-rep" --top 12 ; \
            ncu -i "$OUT/$part/probe.ncu-rep" --page source --csv --print-source sass > "$OUT/$part/source.csv" ;;
    j31) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
           tests/test_skinny_matmul_mgpu.py -k "compiled and (joint or swiglu)" ; \
         timeout 200 python3 bench/decode_step.py --batches 64 --variants default --no-static \
           --glue kernels mgpu_j40 mgpu_j32 mgpu_j48 --rounds 7 --reps 10 --profile /tmp/j31a ; \
         timeout 270 python3 bench/decode_step.py --batches 256 --variants default --no-static \
           --glue kernels attn_ppb4 mgpu256_g40 mgpu256_j40 mgpu256_j40_bm128 mgpu256_j64_bm128 --rounds 5 --reps 10 \
           --profile /tmp/j31b ;;
    j31b) timeout 230 python3 bench/decode_step.py --batches 256 --variants default --no-static \
            --glue kernels gate_up_cublas256 widest_j48 widest_j56 --rounds 7 --reps 10 --profile /tmp/j31c ; \
          timeout 150 python3 bench/throughput.py --no-static --batches 64 256 --long-prompt 0 \
            --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part/throughput" ; \
          timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul_mgpu.py -k "256_row_step or (compiled and (joint or swiglu))" ; \
          timeout 100 python3 bench/decode_step.py --batches 128 --variants default --no-static \
            --glue kernels wide_j40_bm128 wide_j40 --rounds 5 --reps 10 --profile /tmp/j31d ;;
    j31c) timeout 170 python3 bench/throughput.py --no-static --batches 1 64 256 --long-prompt 1024 \
            --long-batch 64 --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part/throughput" ; \
          timeout 170 python3 bench/decode_step.py --batches 256 --variants default --no-static \
            --glue kernels widest_deep_bm128 widest_p_bm128 --rounds 7 --reps 10 --profile /tmp/j31f ; \
          timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul_mgpu.py -k "128_row or rows_past_64 or (compiled and swiglu and 128)" ;;
    s32) timeout 170 python3 bench/throughput.py --no-static --batches 1 64 256 --long-prompt 1024 \
           --long-batch 64 --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part/throughput" ; \
         timeout 150 ncu --clock-control none -k regex:'fused|greedy' --section SpeedOfLight --section Occupancy \
           --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters \
           -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py --calls 1 --cases argmax_256 fused_256x192 \
         && ncu -i "$OUT/$part/probe.ncu-rep" --page details > "$OUT/$part/ncu.txt"; \
         grep -E "^  [a-z_]+|Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Hit|Memory Throughput|Registers Per|Achieved Occ|Theoretical Occ|Executed Ipc A|Issue Slots Busy|Warp Cycles Per Issued" "$OUT/$part/ncu.txt" ;;
    pick32) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_greedy_pick.py -k compiled ; \
            timeout 150 python3 bench/decode_step.py --batches 256 --variants default --no-static \
              --glue kernels pick_wave_fit --rounds 9 --reps 10 --profile /tmp/p32 ; \
            timeout 120 python3 bench/decode_step.py --batches 128 --variants default --no-static \
              --glue kernels pick_wave_fit --rounds 9 --reps 10 --profile /tmp/p32b ;;
    final32) timeout 170 python3 bench/throughput.py --no-static --batches 1 64 256 --long-prompt 1024 \
               --long-batch 64 --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part/throughput" ;;
    shapes33) timeout 330 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_qwen_shapes.py -k decode_step ; \
              timeout 230 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_qwen_shapes.py -k engine ;;
    probe34) timeout 120 python3 -m pytest -v -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               -o faulthandler_timeout=60 tests/test_decode_attention.py -k "(early_gather or joint_rope) and compiled" ; \
             timeout 400 python3 bench/shape_probe.py --shape 7B --batch 64 --limit 90 \
               --variants default no_early_no_joint reference ;;
    probe34b) timeout 500 python3 bench/shape_probe.py --shape 1.5B --batch 1 --limit 90 \
                --variants default no_rope_joint no_autotune reference ;;
    shapes33b) timeout 470 python3 -m pytest -v -x -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                 --durations=0 "tests/test_qwen_shapes.py::test_decode_step_matches_reference[7B-256]" "tests/test_qwen_shapes.py::test_decode_step_matches_reference[7B-64]" "tests/test_qwen_shapes.py::test_decode_step_matches_reference[7B-1]" \
                 "tests/test_qwen_shapes.py::test_decode_step_matches_reference[1.5B-64]" "tests/test_qwen_shapes.py::test_decode_step_matches_reference[3B-256]" "tests/test_qwen_shapes.py::test_decode_step_matches_reference[1.5B-1]" ;;
    j33) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
           tests/test_skinny_matmul_mgpu.py -k "joint_swiglu and compiled" ; \
         timeout 260 python3 bench/decode_step.py --batches 256 --variants default --no-static \
           --glue kernels widest_j80_bm64 widest_j64_bm64_s2 attn_w8 attn_w2 --rounds 9 --reps 10 --profile /tmp/j33 ; \
         timeout 120 python3 bench/decode_step.py --batches 128 --variants default --no-static \
           --glue kernels wide_j80_bm64 --rounds 9 --reps 10 --profile /tmp/j33b ;;
    next31) timeout 80 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_skinny_matmul_mgpu.py -k "accumulate_adds and compiled and 256" ; \
            timeout 200 python3 bench/decode_step.py --batches 256 --variants default --no-static \
              --glue kernels widest_deep_bm128 widest_j32_s2 widest_j40_s2 --rounds 9 --reps 10 --profile /tmp/n31 ;;
    cb29) timeout 420 python3 bench/decode_step.py --batches 64 256 --variants default --no-static \
            --glue kernels cb_serialize cb_concurrent cb_lhs xla_pdl_off --rounds 7 --reps 10 --profile /tmp/cb29 ;;
    final28) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_kernels.py -k "compiled and (decode or lean)" ; \
             timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_skinny_matmul_mgpu.py -k "compiled and (swiglu or model)" ; \
             timeout 100 python3 bench/decode_step.py --batches 64 --variants default --no-static \
               --glue kernels attn_w8 attn_w2 --rounds 7 --reps 10 --profile /tmp/final28a ; \
             timeout 100 python3 bench/decode_step.py --batches 256 --variants default --no-static \
               --glue kernels attn_st1 --rounds 7 --reps 10 --profile /tmp/final28b ;;
    warps28) timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_residual_norm.py -k "one_or_two and compiled" ; \
             timeout 280 python3 bench/decode_step.py --batches 64 256 --variants default --no-static \
               --glue kernels norm_warps1 norm_warps2 norm_warps4 --rounds 7 --reps 10 --profile /tmp/warps28 ;;
    swiglu28) timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_skinny_matmul_mgpu.py -k "swiglu_approx and compiled" ; \
              timeout 200 python3 bench/decode_step.py --batches 64 128 --variants default --no-static \
                --glue kernels swiglu_approx --rounds 7 --reps 10 --profile /tmp/swiglu28 ;;
    tests28) timeout 300 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_decode_attention.py -k "compiled or model" ;;
    lean28) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_decode_attention.py tests/test_kernels.py -k "lean and compiled" ; \
            timeout 250 python3 bench/decode_step.py --batches 1 64 256 --variants default --no-static \
              --glue kernels ftz_exp2 lean_softmax lean_ftz --rounds 7 --reps 10 --profile /tmp/lean28 ; \
            timeout 140 python3 bench/bandwidth.py --sweep-only --budget-s 120 --sweep-configs ftz lean "lean ftz" ;;
    mix28) timeout 240 ncu --clock-control none -k regex:'fused' --section SpeedOfLight --section LaunchStats \
             --section Occupancy --section WarpStateStats --section InstructionStats --section SourceCounters \
             -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py --calls 1 --cases fused_64x192 fused_256x192
           ncu -i "$OUT/$part/probe.ncu-rep" --page details > "$OUT/$part/details.txt"
           grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Registers Per|Achieved Occ|Warp Cycles Per Issued|Executed Ipc|Executed Instructions " \
             "$OUT/$part/details.txt"
           python3 bench/ncu_hotspots.py "$OUT/$part/probe.ncu-rep" --opcodes --top 25
           python3 bench/ncu_hotspots.py "$OUT/$part/probe.ncu-rep" --top 12 ;;
    short27) timeout 200 python3 bench/decode_step.py --batches 64 --variants default --no-static \
               --glue kernels split_short --rounds 7 --reps 10 --profile /tmp/short27 ;;
    final26) timeout 330 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_decode_attention.py tests/test_skinny_matmul.py tests/test_residual_norm.py \
               tests/test_greedy_pick.py -k "compiled or model" ; \
             timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_skinny_matmul_mgpu.py -k model ;;
    reduce25) rm -rf /tmp/hlo25; XLA_FLAGS="--xla_dump_to=/tmp/hlo25 --xla_dump_hlo_as_text" timeout 200 \
                python3 bench/decode_step.py --batches 64 --variants default --no-static --glue kernels \
                --rounds 1 --reps 2 ; \
              for f in $(grep -l 'input_reduce_fusion' /tmp/hlo25/*after_optimizations.txt); do \
                echo "== $f"; grep -n -B2 -A12 '^%fused_reduce\|input_reduce_fusion' "$f" | head -80; done ;;
    headwide) timeout 150 python3 -m pytest -x -q --tb=short -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                tests/test_skinny_matmul_mgpu.py -k "argmax and compiled" ; \
              timeout 200 python3 bench/lm_head.py --rows 128 256 ; \
              timeout 240 python3 bench/decode_step.py --batches 128 256 --variants default --no-static \
                --glue kernels greedy_head256 xla_pick --rounds 5 --reps 10 --profile /tmp/headwide ;;
    graphs22) timeout 300 python3 bench/decode_step.py --batches 64 256 --variants default --no-static \
                --glue kernels while_graphs --rounds 7 --reps 10 ;;
    shapes35) timeout 560 python3 -m pytest -v -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                -o faulthandler_timeout=200 --durations=0 tests/test_qwen_shapes.py -k "decode_step" ;;
    shapes35b) timeout 560 python3 -m pytest -v -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
                 -o faulthandler_timeout=300 --durations=0 tests/test_qwen_shapes.py -k "not decode_step" ;;
    c35) timeout 200 python3 bench/cluster_probe.py --limit 40 \
           --cases p_refill p_refill_nomulticast acc_down256 swiglu256 | tee /tmp/c35_probe.txt ; \
         if grep -q "HUNG\|rc " /tmp/c35_probe.txt; then echo "a clustered launch failed: stopping"; else \
         timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
           tests/test_skinny_matmul_mgpu.py -k "cluster" ; \
         timeout 220 python3 bench/decode_step.py --batches 256 --variants default --no-static \
           --glue kernels widest_c2_gu widest_c2_deep widest_c2 --rounds 7 --reps 10 --profile /tmp/c35 ; fi ;;
    c35b) timeout 200 python3 bench/decode_step.py --batches 64 --variants default --no-static \
            --glue kernels mgpu_c2 mgpu_c2_gu --rounds 7 --reps 10 --profile /tmp/c35b ; \
          timeout 150 python3 bench/decode_step.py --batches 128 --variants default --no-static \
            --glue kernels wide_c2 --rounds 7 --reps 10 --profile /tmp/c35c ;;
    s36) timeout 260 python3 bench/bandwidth.py --sweep-only --budget-s 230 --sweep-configs "splits=2 stages=3" \
           "splits=2 stages=4" "splits=1 stages=4" "splits=1 stages=4 warps=8" "splits=2 stages=3 warps=8" \
           "ppb=4 stages=3" "ppb=4 stages=4" "splits=2 ppb=4 stages=4" "splits=4 stages=3" "warps=2" \
           "splits=16 ppb=4 stages=3" "splits=4 ppb=4 stages=4" "splits=32 stages=3" "splits=64 stages=3" \
           "splits=32 ppb=4 stages=4" ; \
         timeout 200 python3 bench/decode_step.py --batches 256 --variants default --no-static \
           --glue kernels attn_ppb4_st3 attn_ppb4_st4 attn_ppb4 --rounds 7 --reps 10 --profile /tmp/s36 ;;
    s36b) timeout 200 python3 bench/bandwidth.py --sweep-only --sweep-baselines --budget-s 170 --sweep-configs \
            "splits=16 ppb=4" "splits=16 ppb=4 stages=3" "splits=16 ppb=4 stages=4" "splits=16 ppb=4 stages=3 warps=8" \
            "splits=32 ppb=4 stages=3" "splits=16 ppb=8" "splits=16 ppb=2 stages=3" "splits=12 ppb=4 stages=3" ; \
          cp "$OUT/bandwidth.md" "$OUT/s36b_first.md" ; \
          timeout 200 python3 bench/bandwidth.py --sweep-only --budget-s 170 --sweep-configs "x2 ppb=4 stages=3" ;;
    s36c) timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_kernels.py -k "retile or (decode_matches_reference and compiled)" ; \
          timeout 330 python3 bench/bandwidth.py --budget-s 300 ;;
    s36d) timeout 150 python3 bench/bandwidth.py --sweep-only --budget-s 120 --sweep-configs "splits=6 ppb=4" \
            "splits=7 ppb=4" "splits=8 ppb=4" "splits=12 ppb=4" ;;
    # HBM rates side by side (which one the roofline divides by), session 37's defaults end to end (two-stage split
    # attention, the 256-page decode table; the roofline now at both rates), then the middle table at batch 2 / 4,
    # which session 37 did not time (its split counts are table-capped there too)
    s38) timeout 90 python3 bench/hbm_probe.py ; \
         timeout 170 python3 bench/throughput.py --no-static --batches 1 64 256 --long-prompt 1024 \
           --long-batch 64 --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part/throughput" ; \
         timeout 120 python3 bench/decode_step.py --batches 2 4 --context 1088 --table-pages 256 --variants default \
           --no-static --glue kernels table2048 --rounds 5 --reps 10 ;;
    # session 38: 2-4-row steps on the norm-folded kernels (model.FOLD_MAX_ROWS): their compiled tests, then the
    # steps against the partial sums' glue in one process (run at 0d2c474, where FOLD_MAX_ROWS was 4 and "fold1" the
    # glue; the folded route lost, so 1 is the default now and "fold4" the opt-in)
    fold38) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_skinny_matmul.py \
              -k "several_rows or norm or one_row" ; \
            timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "not gpu" \
              tests/test_decode_attention.py -k model_decode_step ; \
            timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_qwen_shapes.py \
              -k "4-" ; \
            for ctx in 192 1088; do timeout 120 python3 bench/decode_step.py --batches 2 4 --context $ctx \
              --variants default --no-static --glue kernels fold4 --rounds 5 --reps 10 ; done ;;
    # session 39's padding of small decode calls to 8 rows (model.PAD_SMALL_DECODE), not yet run on the GPU: the
    # engine at 1.5B / 7B / 14B (1-16-row calls; 0.5B long context) against the reference engine, then batch 2 / 4 / 8
    # at 0.5B and 1 / 8 at 1.5B again (the steps the rule picks between)
    pad39) timeout 330 python3 -m pytest -q -s -rf -p no:cacheprovider -o addopts="" -m gpu --timeout 150 \
             tests/test_qwen_shapes.py -k engine ; \
           timeout 120 python3 bench/decode_step.py --batches 2 4 8 --variants default --no-static --glue kernels \
             --rounds 5 --reps 10 ; \
           timeout 140 python3 bench/decode_step.py --shape 1.5B --batches 1 8 --context 1024 --variants default \
             --no-static --glue kernels --rounds 3 --reps 5 ;;
    # after pad39: end to end at the 1.5B shape, batch 1 / 2 / 4, padding off then on (each its own process)
    pad39b) for pad in 0 1; do JAXSERVE_PAD_SMALL_DECODE=$pad timeout 280 python3 bench/throughput.py --shape 1.5B \
              --batches 1 2 4 --long-prompt 0 --no-hf --no-static --impls pallas --out "$OUT/$part/pad$pad" ; done ;;
    # session 40: pad39b again after the engine pads past its largest bucket (max_running = batch < 8), 1.5B then 0.5B
    pad40) for shape in 1.5B 0.5B; do for pad in 0 1; do JAXSERVE_PAD_SMALL_DECODE=$pad timeout 200 python3 \
             bench/throughput.py --shape $shape --batches 1 2 4 --long-prompt 0 --no-hf --no-static --impls pallas \
             --out "$OUT/$part/$shape-pad$pad" ; done; done ;;
    # session 40: the padding over long contexts (16k-key prompts), 1.5B batch 1 and 0.5B batch 2, padding off then on
    padlong) for sb in 1.5B:1 0.5B:2; do for pad in 0 1; do JAXSERVE_PAD_SMALL_DECODE=$pad timeout 140 python3 \
               bench/throughput.py --shape ${sb%:*} --batches ${sb#*:} --prompt-len 16384 --output-len 64 --runs 1 \
               --long-prompt 0 --no-hf --no-static --impls pallas --out "$OUT/$part/${sb%:*}-pad$pad" ; done; done ;;
    # the GPU-marked engine tests alone (1.5B / 7B / 14B engines padded, the 0.5B long-context one unpadded)
    engine) timeout 330 python3 -m pytest -q -s -rf -p no:cacheprovider -o addopts="" -m gpu --timeout 150 \
              tests/test_qwen_shapes.py -k engine ;;
    # session 40 (not yet run): padded calls running only their real rows' attention (model.PAD_LIVE_ROWS): the
    # compiled kernel test and the engine tests with it on; then (livepad_e2e) 1.5B batch 1 and 0.5B batch 2 over
    # 16k-key and 128-token prompts, live rows off (decode_shape's refusal: unpadded over 16k) then on
    livepad) timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_decode_attention.py -k "live_rows and compiled" ; \
             JAXSERVE_PAD_LIVE_ROWS=1 timeout 300 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu \
               --timeout 150 tests/test_qwen_shapes.py -k "engine and not long_context" ;;
    livepad_e2e) for sb in 1.5B:1 0.5B:2; do for prompt in 16384 128; do for live in 0 1; do JAXSERVE_PAD_LIVE_ROWS=$live \
               timeout 120 python3 bench/throughput.py --shape ${sb%:*} --batches ${sb#*:} --prompt-len $prompt \
               --output-len 64 --runs 1 --long-prompt 0 --no-hf --no-static --impls pallas \
               --out "$OUT/$part/${sb%:*}-p$prompt-live$live" ; done; done; done ;;
    # session 41: the default (live rows where padding would cut the splits) through the GPU engine tests, then end to
    # end over short, middle and long prompts (and the middle one with live rows off: unpadded there)
    live41) timeout 300 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu --timeout 150 \
              tests/test_qwen_shapes.py -k engine ; \
            for run in 1.5B:1:128:1 1.5B:1:4096:1 1.5B:1:4096:0 1.5B:1:16384:1 0.5B:2:128:1; do
              IFS=: read shape batch prompt live <<< "$run"; JAXSERVE_PAD_LIVE_ROWS=$live timeout 100 python3 \
                bench/throughput.py --shape $shape --batches $batch --prompt-len $prompt --output-len 64 --runs 1 \
                --long-prompt 0 --no-hf --no-static --impls pallas --out "$OUT/$part/$shape-p$prompt-live$live" ; done ;;
    # session 41: run 44's headline workload again after sessions 40-41's decode shapes (padding, live rows)
    final41) timeout 200 python3 bench/throughput.py --no-static --batches 1 64 256 --long-prompt 1024 \
               --long-batch 64 --decode-steps 8 --impls pallas --no-hf --out "$OUT/$part" ;;
    floor42) timeout 300 python3 bench/kernel_floor.py ;;
    floor42b) timeout 250 python3 bench/kernel_floor.py --chains stream --stream-rows 2 8 ;;
    kv42) timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
            tests/test_skinny_matmul.py tests/test_decode_attention.py -k "touching or (model_decode_step and o)" ; \
          for ctx in 192 64; do timeout 150 python3 bench/decode_step.py --batches 1 --context $ctx --variants default \
            --no-static --glue kernels prefetch_kv --rounds 7 --reps 10 --profile /tmp/kv42_$ctx ; done ;;
    kv42b) timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
             tests/test_skinny_matmul.py tests/test_decode_attention.py -k "touching or (model_decode_step and touch)" ; \
           timeout 150 python3 bench/decode_step.py --batches 1 --context 192 --variants default --no-static \
             --glue kernels prefetch_kv --rounds 7 --reps 10 --profile /tmp/kv42b ;;
    kv42c) for ctx in 192 64; do timeout 120 python3 bench/decode_step.py --batches 1 --context $ctx --variants default \
             --no-static --glue kernels no_prefetch_kv --rounds 9 --reps 10 --profile /tmp/kv42c_$ctx ; done ;;
    pdl44) timeout 240 python3 bench/kernel_floor.py --chains stream --pdl --sizes-mb 0.05 0.5 2 8.7 17.4 ;;
    loop44) timeout 400 python3 bench/kernel_floor.py --chains stream --sizes-mb 2 8.7 17.4 35 --rounds 5 --loop p132r2s1w4 p264r2s1w4 p528r2s1w4 p1056r2s1w4 p528r2s3w4 p528r2s1w4f p1056r2s1w4f p264r8s1w8 ;;
    struct45) timeout 240 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_structured_engine.py ; \
              timeout 330 python3 bench/structured.py --batches 1 64 256 --output-len 128 --out "$OUT/$part" ;;
    mixes46) timeout 300 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_guide_pool.py \
               tests/test_structured_engine.py ; \
             timeout 300 python3 bench/structured.py --mixes 8 --rounds 16 --batches 64 --output-len 32 --out "$OUT/$part" ;;
    masked46) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_greedy_pick.py ; \
              for on in 0 1; do echo "== ab JAXSERVE_MASKED_PICK=$on"; \
                JAXSERVE_MASKED_PICK=$on timeout 200 python3 bench/structured.py --batches 64 256 --output-len 128 ; \
              done ;;
    dp46) timeout 280 python3 bench/replicas.py --devices 1 2 --rows 256 --requests 1024 --out "$OUT/$part" ; \
          timeout 280 python3 bench/replicas.py --devices 1 2 --rows 256 --requests 1024 --shared-prefix ;;
    spec47) timeout 540 python3 bench/speculative.py --workload repeat --shape 0.5B --k 4 8 --batch 1 8 64 \
              --out "$OUT/$part" ;;
    spec47b) timeout 300 python3 bench/speculative.py --workload code --k 2 4 8 --batch 1 8 --output-len 128 ;;
    lora48) timeout 500 python3 bench/lora.py --shape 0.5B --batch 1 64 256 --out "$OUT/$part" ;;
    embed49) timeout 300 python3 bench/embed.py --shape 0.5B --batch 64 256 --prompt-len 128 512 --out "$OUT/$part" ;;
    tp50) timeout 400 python3 bench/tensor_parallel.py --shape 7B --tp 1 2 --batches 1 64 --out "$OUT/$part" ; \
          timeout 200 python3 bench/tensor_parallel.py --shape 0.5B --tp 1 2 --batches 64 256 ;;
    fp8_50) timeout 500 python3 bench/tensor_parallel.py --shape 7B --tp 1 --quantization none fp8 --batches 1 64 256 \
              --out "$OUT/$part" ;;
    fp8_51) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_skinny_matmul.py \
              -k fp8 ; \
            JAXSERVE_FP8_SKINNY=1 timeout 260 python3 bench/tensor_parallel.py --shape 7B --tp 1 --quantization none fp8 \
              --batches 1 64 --output-len 64 --out "$OUT/$part" ; \
            echo "== ab JAXSERVE_FP8_SKINNY=0"; JAXSERVE_FP8_SKINNY=0 timeout 200 python3 bench/tensor_parallel.py \
              --shape 7B --tp 1 --quantization fp8 --batches 1 64 --output-len 64 ;;
    h100_52) timeout 250 python3 bench/bandwidth.py --sweep-only --sweep-baselines --budget-s 215 \
               --sweep-configs 'h100*' --out "$OUT/$part/bandwidth" ; \
             timeout 135 python3 bench/decode_step.py --batches 1 --context 192 --variants default --no-static \
               --glue kernels gemv_t1k gemv_w16 gemv_k2048 o_attn_pf unroll2 no_prefetch_kv --rounds 5 --reps 10 ; \
             timeout 135 python3 bench/decode_step.py --batches 256 --context 192 --variants default --no-static \
               --glue kernels widest_j48 widest_j32_s2 widest_deep_bm128 attn_st1 head_b256 unroll2 --rounds 5 \
               --reps 10 ;;
    long52) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_kernels.py \
              -k "long_loops or retiled" ; \
            timeout 150 python3 bench/bandwidth.py --sweep-only --budget-s 120 --sweep-configs "h100 stages=2" \
              --out "$OUT/$part/sweep" ; \
            timeout 330 python3 bench/bandwidth.py --budget-s 285 --out "$OUT/$part/bandwidth" ;;
    fp8test_52) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu \
                  tests/test_skinny_matmul.py -k fp8 ;;
    fp8kv53) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_fp8_kv.py \
               tests/test_kernels.py tests/test_decode_attention.py \
               -k "fp8 or test_decode_matches_reference or matches_rope_scatter or test_prefill_chunk" ; \
             timeout 330 python3 bench/bandwidth.py --fp8-only --budget-s 290 --out "$OUT/$part/bandwidth" ;;
    fp8sweep53) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_fp8_kv.py \
                  -k "fused" ; \
                timeout 300 python3 bench/bandwidth.py --fp8-only --budget-s 270 --fp8-shapes 3 7 1 6 0 \
                  --fp8-configs "x1 ppb=16" "x1 ppb=16 stages=2" "x1 stages=4" "x2" "x1 warps=8" \
                  "x1 ppb=16 warps=8" --out "$OUT/$part/bandwidth" ;;
    fp8b53) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_fp8_kv.py ; \
            timeout 150 python3 bench/bandwidth.py --fp8-only --budget-s 130 --fp8-shapes 5 6 7 8 \
              --fp8-configs "x2" "x1 stages=4" "x1 vmask=where" "x1 ppb=4" "x1 warps=2" --out "$OUT/$part/bandwidth" ;;
    fp8next54) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_fp8_kv.py \
                 -k compiled_decode_paths ; \
               timeout 100 python3 bench/kv_scale_mutation.py --batches 4 ; \
               timeout 260 ncu --clock-control none -k regex:'paged' --section SpeedOfLight --section Occupancy \
                 --section WarpStateStats --section LaunchStats -f -o "$OUT/$part/probe" python3 bench/ncu_probe.py \
                 --calls 1 --cases 05b_64x8k 05b_64x8k_fp8 && ncu -i "$OUT/$part/probe.ncu-rep" --page details ;;
    ragged55) timeout 300 python3 bench/ragged_finish.py --shape 0.5B --batches 64 256 --rounds 5 --out "$OUT/$part" ; \
              for on in 0 1; do echo "== JAXSERVE_CHAIN_PAST_FINISHES=$on"; \
                JAXSERVE_CHAIN_PAST_FINISHES=$on timeout 150 python3 bench/structured.py --batches 256 --output-len 128 ; \
              done ;;
    arrivals55) export JAX_COMPILATION_CACHE_DIR=/tmp/jaxserve_jc JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
                for on in 0 1; do echo "== JAXSERVE_PREFILL_BEHIND_DECODE=$on"; \
                  JAXSERVE_PREFILL_BEHIND_DECODE=$on timeout 150 python3 bench/throughput.py --policies \
                    --num-requests 96 --rate 64 --max-running 16 --prompt-len 256 --output-len 32 --decode-steps 4 \
                    --dtype bfloat16 --out "$OUT/$part/behind$on" ; done ;;
    lora57) timeout 60 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_lora.py \
              -k accumulating_glue ; \
            echo "== per-layer stacks" ; timeout 220 python3 bench/lora.py --shape 0.5B --batch 64 256 1 \
              --profile /tmp/lp57 --out "$OUT/$part/new" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" ; \
            if [ -d old_tree ]; then echo "== stacked (old_tree)" ; (cd old_tree && timeout 140 python3 bench/lora.py \
              --shape 0.5B --batch 64 256 1 --no-check --profile /tmp/lp56 --out "$OUT/$part/old" 2>&1 \
              | grep -v "^WARNING\|^I0000\|^W0000") ; fi ;;
    lora57d) timeout 90 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_lora_matmul.py ; \
             lora_settings 100 "--batch 64 256" "JAXSERVE_LORA_KERNELS=0" "JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_STAGES=3" \
               "JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_STAGES=3 JAXSERVE_LORA_INLINE_K=0" \
               "JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_SHRINK=xla" ;;
    lora57f) timeout 40 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_lora_matmul.py \
               -k "staged or unrolled" 2>&1 | tail -2 ; \
             lora_settings 80 "--batch 64" "JAXSERVE_LORA_KERNELS=0" "JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_STAGES=3" \
               "JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_UNROLL=1" ;;
    lora59) timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_skinny_matmul_mgpu.py \
              -k term 2>&1 | tail -3 ; \
            echo "== JAXSERVE_LORA_FOLD=1" ; JAXSERVE_LORA_FOLD=1 timeout 230 python3 bench/lora.py --shape 0.5B \
              --batch 64 256 --check-dtype bfloat16 --profile /tmp/lp59 --out "$OUT/$part/fold" 2>&1 \
              | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp59 ; \
            echo "== JAXSERVE_LORA_FOLD=0" ; JAXSERVE_LORA_FOLD=0 timeout 120 python3 bench/lora.py --shape 0.5B \
              --batch 64 256 --no-check --out "$OUT/$part/xla" 2>&1 \
              | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ;;
    lora59b) timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_lora.py -k "float32_models_logits" 2>&1 | tail -3 ; \
             echo "== JAXSERVE_LORA_FOLD=1" ; rm -rf /tmp/hlo59 ; JAXSERVE_LORA_FOLD=1 \
               XLA_FLAGS="--xla_dump_to=/tmp/hlo59 --xla_dump_hlo_module_re=.*decode.*" timeout 240 python3 bench/lora.py \
               --shape 0.5B --batch 64 256 --check-dtype bfloat16 --profile /tmp/lp59b --profile-top 45 \
               --out "$OUT/$part/fold" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp59b ; \
             echo "== convert fusions in the decode HLO" ; ls /tmp/hlo59 | grep -c after_optimizations ; \
             grep -h "convert" /tmp/hlo59/*decode*after_optimizations.txt 2>/dev/null | grep "fusion(" \
               | sed 's/, metadata=.*//' | cut -c1-260 | sort | uniq -c | sort -rn | head -30 ; \
             echo "== JAXSERVE_LORA_FOLD=0 (check)" ; JAXSERVE_LORA_FOLD=0 timeout 100 python3 bench/lora.py \
               --shape 0.5B --batch 64 --check-dtype bfloat16 2>&1 | grep "^|\|^Check" ;;
    lora59c) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu \
               tests/test_skinny_matmul_mgpu.py -k "term and (accumulate or 4864)" 2>&1 | tail -3 ; echo ; \
             timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_lora.py -k "float32_models_logits" 2>&1 | tail -2 ; echo ; \
             echo "== JAXSERVE_LORA_FOLD=1 JAXSERVE_LORA_GLUE=1" ; JAXSERVE_LORA_FOLD=1 JAXSERVE_LORA_GLUE=1 timeout 150 \
               python3 bench/lora.py --shape 0.5B --batch 64 256 --no-check --profile /tmp/lp59c --profile-top 30 \
               --out "$OUT/$part/glue" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp59c ; \
             echo "== JAXSERVE_LORA_FOLD=1 JAXSERVE_LORA_GLUE=0" ; JAXSERVE_LORA_FOLD=1 JAXSERVE_LORA_GLUE=0 timeout 110 \
               python3 bench/lora.py --shape 0.5B --batch 64 256 --no-check --out "$OUT/$part/plain" 2>&1 | grep "^|" ;;
    lora59d) echo "== defaults" ; rm -rf /tmp/hlo59 ; XLA_FLAGS="--xla_dump_to=/tmp/hlo59 --xla_dump_hlo_module_re=.*decode.*" \
               timeout 200 python3 bench/lora.py --shape 0.5B --batch 1 64 256 --no-check --profile /tmp/lp59d \
               --profile-top 30 --out "$OUT/$part/defaults" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; \
             rm -rf /tmp/lp59d ; echo "== wrapped_convert in the decode HLO" ; \
             grep -h "wrapped_convert[.0-9]* = " /tmp/hlo59/*decode*after_optimizations.txt 2>/dev/null \
               | sed 's/, metadata=.*//' | cut -c1-220 | sort | uniq -c | sort -rn | head -12 ; \
             echo "== JAXSERVE_LORA_FOLD=0 JAXSERVE_LORA_GLUE=0" ; JAXSERVE_LORA_FOLD=0 JAXSERVE_LORA_GLUE=0 timeout 110 \
               python3 bench/lora.py --shape 0.5B --batch 64 256 --no-check --out "$OUT/$part/xla" 2>&1 | grep "^|" ;;
    lora59e) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_skinny_matmul.py tests/test_lora.py -k "own_slot or (float32_models_logits and mgpu)" 2>&1 | tail -2 ; \
             echo "== defaults (the one-launch shrink)" ; timeout 110 python3 bench/lora.py --shape 0.5B --batch 64 256 \
               --no-check --profile /tmp/lp59e --profile-top 12 --out "$OUT/$part/kernel" 2>&1 \
               | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp59e ; \
             echo "== JAXSERVE_LORA_SHRINK_MAX_K=0" ; JAXSERVE_LORA_SHRINK_MAX_K=0 timeout 100 python3 bench/lora.py \
               --shape 0.5B --batch 64 256 --no-check --out "$OUT/$part/xla" 2>&1 | grep "^|" ;;
    down62s) down_shrink_ab 150 90 "64" ; nvidia-smi --query-gpu=name --format=csv ;;
    d62) bash "$0" down62 ; cat "$OUT/down62/log.txt" ; \
         timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_decode_attention.py \
           tests/test_qwen_shapes.py -k "decode_o or early_gather or one_block or writes_o_projs or \
           (decode_step_matches_reference and 0.5B-None-1)" 2>&1 | tail -4 ; nvidia-smi --query-gpu=name --format=csv ;;
    down62) down_shrink_ab 220 115 "64 256" ;;
    down63) lora_ab JAXSERVE_LORA_DOWN_SHRINK 140 18 "--batch 256 --profile-batch 256" ;;
    s62) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_decode_attention.py \
           -k "decode_o or early_gather or one_block or writes_o_projs" 2>&1 | tail -4 ; \
         timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_qwen_shapes.py \
           -k "decode_step_matches_reference and 0.5B-None-1" 2>&1 | tail -3 ; \
         timeout 120 python3 bench/decode_step.py --batches 1 --context 192 --variants default --no-static \
           --glue kernels --rounds 5 --reps 10 --profile /tmp/p62 ; rm -rf /tmp/p62 ; \
         bash "$0" lora61c ; cat "$OUT/lora61c/log.txt" ; \
         echo "== defaults at 64 rows (lora61c's prefetch-off baseline on this machine)" ; timeout 50 python3 \
           bench/lora.py --shape 0.5B --batch 64 --no-check --profile /tmp/lp62 --profile-top 8 2>&1 \
           | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp62 ;;
    delta64) timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_lora.py \
               -k "transformers_with_the_adapter_merged or (float32_models_logits and mgpu)" 2>&1 | tail -3 ; \
             lora_trees 150 "--batch 256 --no-check --profile /tmp/lp_trees --profile-batch 256 --profile-top 14" ;;
    parity65) timeout 150 python3 bench/f32_parity.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; \
              echo "== JAX_PLATFORMS=cpu"; JAX_PLATFORMS=cpu timeout 100 python3 bench/f32_parity.py 2>&1 | grep "^|\|^backend" ; \
              timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_model_parity.py \
                -k "logits_and_greedy or bfloat16_load" 2>&1 | grep -E "^E |passed|failed" | head -20 ;;
    parity65b) timeout 150 python3 bench/f32_parity.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; \
               echo "== --dtype auto"; timeout 150 python3 bench/f32_parity.py --dtype auto 2>&1 | grep "^| engine" ; \
               timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_engine.py \
                 tests/test_lora.py -k "matches_transformers_and_running_alone or prompt_logprobs_match_transformers \
                 or transformers_with_the_adapter_merged" 2>&1 | grep -E "^E |passed|failed" | head -30 ;;
    merged65) echo "== base engine: float32 against transformers, no adapters"; timeout 110 python3 -m pytest -q -rf \
                -p no:cacheprovider -o addopts="" tests/test_engine.py -k "matches_transformers_and_running_alone or \
                prompt_logprobs_match_transformers" 2>&1 | grep -E "^E |passed|failed" | head -20 ; \
              for env in JAXSERVE_NONE=1 JAXSERVE_DECODE_GLUE=xla JAXSERVE_DECODE_PROJECTIONS=xla JAXSERVE_LORA_GLUE=0; do \
                echo "== $env"; env "$env" timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" \
                  --tb=short tests/test_lora.py -k "transformers_with_the_adapter_merged" 2>&1 \
                  | grep -E "^E |^tests/|^[a-z_]+\.py:[0-9]+|passed|failed" | head -40; done ;;
    merged64) for d in . old_tree; do [ -d "$d" ] || continue; echo "== $d"; (cd "$d" && timeout 100 python3 -m pytest \
                -q -rf -p no:cacheprovider -o addopts="" tests/test_lora.py -k "transformers_with_the_adapter_merged" \
                2>&1 | grep -E "^E |^tests/|passed|failed" | head -30); done ;;
    lora61c) lora_ab JAXSERVE_LORA_ATTENTION_SHRINK 130 12 "--batch 256 --profile-batch 256" ; \
             echo "== JAXSERVE_ATTENTION_SHRINK_PREFETCH=0" ; JAXSERVE_ATTENTION_SHRINK_PREFETCH=0 timeout 100 python3 \
               bench/lora.py --shape 0.5B --batch 64 --no-check --profile /tmp/lp61c --profile-top 8 2>&1 \
               | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp61c ;;
    lora61b) timeout 170 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
               tests/test_decode_attention.py tests/test_skinny_matmul_mgpu.py tests/test_lora.py \
               -k "writes_o_projs or shrink_errors or side_by_side or float32_models_logits" 2>&1 | tail -4 ; \
             for on in 1 0; do echo "== JAXSERVE_LORA_ATTENTION_SHRINK=$on" ; JAXSERVE_LORA_ATTENTION_SHRINK=$on \
               timeout 115 python3 bench/lora.py --shape 0.5B --batch 64 256 --no-check --profile /tmp/lp61b \
               --profile-top 16 --out "$OUT/$part/on$on" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; \
               rm -rf /tmp/lp61b ; done ; \
             echo "== JAXSERVE_LORA_ATTENTION_SHRINK=1 again" ; timeout 90 python3 bench/lora.py --shape 0.5B \
               --batch 64 256 --no-check 2>&1 | grep "^|" ;;
    lora61) timeout 130 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_lora.py -k "float32_models_logits" 2>&1 | tail -3 ; \
            for run in o:256:1024 o_down:256:8192 default:0:1024; do IFS=: read label rows maxk <<< "$run"; \
              echo "== $label: JAXSERVE_LORA_SHRINK_REDUCE_ROWS=$rows JAXSERVE_LORA_SHRINK_REDUCE_MAX_K=$maxk" ; \
              JAXSERVE_LORA_SHRINK_REDUCE_ROWS=$rows JAXSERVE_LORA_SHRINK_REDUCE_MAX_K=$maxk timeout 115 python3 \
                bench/lora.py --shape 0.5B --batch 64 256 --no-check --profile /tmp/lp61 --profile-top 14 \
                --out "$OUT/$part/$label" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp61 ; done ;;
    lora60) timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m "gpu or not gpu" \
              tests/test_residual_norm.py tests/test_lora.py -k "shrink or float32_models_logits" 2>&1 | tail -3 ; \
            echo "== JAXSERVE_LORA_NORM_SHRINK=1 (default)" ; timeout 150 python3 bench/lora.py --shape 0.5B \
              --batch 64 256 --check-dtype bfloat16 --profile /tmp/lp60 --profile-top 30 --out "$OUT/$part/norm" 2>&1 \
              | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp60 ; \
            echo "== JAXSERVE_LORA_NORM_SHRINK=0" ; JAXSERVE_LORA_NORM_SHRINK=0 timeout 140 python3 bench/lora.py \
              --shape 0.5B --batch 64 256 --no-check --profile /tmp/lp60x --profile-top 12 --out "$OUT/$part/xla" \
              2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp60x ; \
            echo "== JAXSERVE_LORA_NORM_SHRINK=1 again" ; timeout 110 python3 bench/lora.py --shape 0.5B \
              --batch 64 256 --no-check --out "$OUT/$part/norm2" 2>&1 | grep "^|" ;;
    lora60b) JAXSERVE_NORM_SHRINK_CHUNK=32 timeout 60 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu \
               tests/test_residual_norm.py -k shrink 2>&1 | tail -2 ; \
             for env in "JAXSERVE_LORA_NORM_SHRINK=0" "JAXSERVE_NORM_SHRINK_CHUNK=16" "JAXSERVE_NORM_SHRINK_CHUNK=32"; do \
               echo "== $env, 256 rows" ; env $env timeout 110 python3 bench/lora.py --shape 0.5B --batch 256 --no-check \
                 --profile /tmp/lp60b --profile-batch 256 --profile-top 12 2>&1 \
                 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp60b ; done ; \
             echo "== JAXSERVE_NORM_SHRINK_CHUNK=32, 64 rows" ; JAXSERVE_NORM_SHRINK_CHUNK=32 timeout 90 python3 bench/lora.py \
               --shape 0.5B --batch 64 --no-check --profile /tmp/lp60c --profile-top 12 2>&1 \
               | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; rm -rf /tmp/lp60c ;;
    lora58) timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_skinny_matmul.py \
              -k lora 2>&1 | tail -3 ; \
            echo "== check (float32, folded)" ; JAXSERVE_LORA_FOLD=1 timeout 130 python3 bench/lora.py --shape 0.5B \
              --batch 64 2>&1 | grep "^Check\|^|" ; \
            for on in 0 1; do echo "== JAXSERVE_LORA_FOLD=$on" ; JAXSERVE_LORA_FOLD=$on timeout 130 python3 bench/lora.py \
              --shape 0.5B --batch 64 256 --no-check --profile /tmp/lp58 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|Writing" ; \
              rm -rf /tmp/lp58 ; done ;;
    lora58b) timeout 240 python3 bench/lora_fold.py --rows 64 2>&1 | grep "^|\|^#" ; \
             for env in "JAXSERVE_LORA_FOLD=0" "JAXSERVE_LORA_FOLD=1 JAXSERVE_LORA_SHRINK_SPLITS=8" \
                 "JAXSERVE_LORA_FOLD=1 JAXSERVE_LORA_SHRINK_SPLITS=2" ; do echo "== $env" ; env $env timeout 100 \
               python3 bench/lora.py --shape 0.5B --batch 64 --no-check --profile /tmp/lp58b 2>&1 \
               | grep "^|\|GPU busy\|skinny" ; rm -rf /tmp/lp58b ; done ;;
    lora58c) echo "== JAXSERVE_LORA_FOLD=1" ; JAXSERVE_LORA_FOLD=1 timeout 130 python3 bench/lora.py --shape 0.5B \
               --batch 64 --profile /tmp/lp58c 2>&1 | grep "^|\|^Check\|GPU busy\|skinny" ; \
             echo "== JAXSERVE_LORA_FOLD=0" ; JAXSERVE_LORA_FOLD=0 timeout 90 python3 bench/lora.py --shape 0.5B \
               --batch 64 --no-check 2>&1 | grep "^|" ;;
    lora57c) timeout 90 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_lora_matmul.py \
               -k xla ; \
             lora() { timeout 110 python3 bench/lora.py --shape 0.5B --batch 64 256 --no-check "$@" 2>&1 \
               | grep -v "^WARNING\|^I0000\|^W0000" ; } ; \
             echo "== per-layer stacks" ; lora --profile /tmp/lpc1 --out "$OUT/$part/new" ; \
             if [ -d old_tree ]; then echo "== stacked (old_tree)" ; \
               (cd old_tree && lora --profile /tmp/lpc0 --out "$OUT/$part/old") ; fi ; \
             echo "== JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_SHRINK=xla" ; \
             JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_SHRINK=xla lora --profile /tmp/lpc2 --out "$OUT/$part/xla" ; \
             timeout 90 python3 bench/lora_kernels.py --rows 64 --reps 5 --configs xla --out "$OUT/$part" 2>&1 \
               | grep "^|" | tail -40 ;;
    lora57b) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_lora_matmul.py \
               -k xla ; \
             for glue in 0 1; do echo "== JAXSERVE_LORA_GLUE=$glue JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_SHRINK=xla" ; \
               JAXSERVE_LORA_GLUE=$glue JAXSERVE_LORA_KERNELS=1 JAXSERVE_LORA_SHRINK=xla timeout 110 python3 \
                 bench/lora.py --shape 0.5B --batch 64 256 --no-check --profile /tmp/lpx$glue \
                 --out "$OUT/$part/xla_g$glue" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" ; done ; \
             timeout 100 python3 bench/lora_kernels.py --rows 64 --reps 5 --configs xla --out "$OUT/$part" 2>&1 \
               | grep "^|" | tail -40 ;;
    lora56) timeout 100 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_lora_matmul.py ; \
            for set in "1 1 150" "0 0 130" "0 1 110"; do read glue kern limit <<< "$set"; \
              echo "== JAXSERVE_LORA_GLUE=$glue JAXSERVE_LORA_KERNELS=$kern"; \
              JAXSERVE_LORA_GLUE=$glue JAXSERVE_LORA_KERNELS=$kern timeout $limit python3 bench/lora.py --shape 0.5B \
                --batch 64 256 1 --no-check --profile /tmp/lp$glue$kern --out "$OUT/$part/g${glue}k$kern" 2>&1 \
                | grep -v "^WARNING\|^I0000\|^W0000" ; done ; \
            timeout 80 python3 bench/lora_kernels.py --rows 64 --reps 5 --out "$OUT/$part" 2>&1 | grep "^|" | tail -40 ; \
            timeout 60 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_lora.py \
              -k accumulating_glue ;;
    lora55) timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_lora.py \
              -k accumulating_glue ; \
            for on in 0 1; do echo "== JAXSERVE_LORA_GLUE=$on"; \
              JAXSERVE_LORA_GLUE=$on timeout 200 python3 bench/lora.py --shape 0.5B --batch 8 64 256 \
                --out "$OUT/$part/glue$on" ; done ;;
    touch54) timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu tests/test_kv_touch.py ; \
             timeout 400 python3 bench/decode_step.py --batches 256 64 --context 192 --variants default --no-static \
               --glue kernels kv_touch_cc kv_touch_cc_e2 kv_touch_cc_e8 kv_touch_early_cc --rounds 5 --reps 10 \
               --profile /tmp/kt ;;
    fp8e2e53) timeout 400 python3 bench/throughput.py --no-static --no-hf --batches 64 --prompt-len 2048 \
                --output-len 128 --long-prompt 0 --runs 3 --kv-cache-dtypes auto fp8 --out "$OUT/$part/long" ; \
              timeout 190 python3 bench/throughput.py --no-static --no-hf --batches 256 --long-prompt 0 --runs 3 \
                --kv-cache-dtypes auto fp8 --out "$OUT/$part/short" ;;
    ranks68) timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_greedy_pick.py \
               tests/test_sampling.py -k "runner or logprobs or ranks" ; \
             timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_llm.py \
               tests/test_speculative.py tests/test_engine.py -k "vllm_s_objects or probabilities or rows_that_sample or logprob" ; \
             timeout 150 python3 bench/logprob_cost.py --rows 1 64 256 ;;
    sampler68) timeout 150 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_llm.py \
                 -k vllm_s_objects ; \
               timeout 400 python3 bench/sampler_cost.py --rows 1 64 256 ;;
    chunks68) for c in 0 64; do echo "== ab JAXSERVE_CANDIDATE_CHUNKS=$c"; \
                JAXSERVE_CANDIDATE_CHUNKS=$c timeout 150 python3 bench/sampler_cost.py --rows 1 64 256 --top-k \
                ; done ; \
              timeout 250 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_sampling.py ;;
    chunks68b) for c in 0 16 32 64; do echo "== ab JAXSERVE_CANDIDATE_CHUNKS=$c"; \
                 JAXSERVE_CANDIDATE_CHUNKS=$c timeout 150 python3 bench/sampler_cost.py --rows 1 64 256 --top-k \
                 ; done ; \
               timeout 150 python3 bench/logprob_cost.py --rows 1 64 256 ; \
               timeout 250 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_sampling.py ;;
    chunks68c) for c in 0 64; do echo "== ab JAXSERVE_CANDIDATE_CHUNKS=$c"; \
                 JAXSERVE_CANDIDATE_CHUNKS=$c timeout 200 python3 bench/sampler_cost.py --rows 1 64 256 --top-k \
                   --profile /tmp/sc$c ; done ; \
               timeout 250 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_sampling.py \
                 tests/test_speculative.py -k "not greedy_rows_keep or not bf16" ;;
    chunks68d) for t in 128 64 32; do echo "== ab JAXSERVE_CHUNK_TOKENS=$t"; \
                 JAXSERVE_CHUNK_TOKENS=$t timeout 150 python3 bench/sampler_cost.py --rows 64 256 --top-k \
                   --settings top_p top_k top_p+logprobs5 ; done ; \
               timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" tests/test_sampling.py ;;
    noise68) for h in 0 1; do echo "== ab JAXSERVE_HASH_NOISE=$h"; \
               JAXSERVE_HASH_NOISE=$h timeout 100 python3 bench/sampler_cost.py --rows 64 256 --top-k \
                 --settings temp top_p ; done ;;
    stream69) stream_ab 250 512 256 ;;
    warm74) python3 -c "from bench.serving import make_random_checkpoint as m; m('qwen2.5-0.5b', '/tmp/q05')" \
              || continue
            for threads in 8 1; do timeout 200 python3 bench/warmup.py --model /tmp/q05 --threads $threads \
              --batch-buckets 1 8 64 256 --max-running 256 --max-tokens-per-step 2048 --num-pages 16384 \
              --decode-steps 8 --prompts 256 --max-tokens 64; done
            STREAM_AB_ARGS="--warmup 512 --engine-process" stream_ab 150 512 256 1 ;;
    api74) python3 -c "from bench.serving import make_random_checkpoint as m; m('qwen2.5-0.5b', '/tmp/q05')" \
              || continue
           timeout 170 python3 bench/warmup.py --model /tmp/q05 --threads 8 1 --greedy-only --batch-buckets 1 8 64 256 \
             --max-running 256 --max-tokens-per-step 2048 --num-pages 16384 --decode-steps 8 --prompts 256 \
             --max-tokens 64
           for n in 1 4; do STREAM_AB_ARGS="--warmup 512 --engine-process --api-server-count $n" \
             stream_ab 140 512 256 1; done ;;
    swarm74) JAXSERVE_COMPILE_THREADS=8 STREAM_AB_ARGS="--server-warmup --warmup 64 --engine-process" \
               stream_ab 400 512 256 1 ;;
    proc73a|proc73b) interval=$([ "$part" = proc73a ] && echo 1 || echo 8)
            for round in 1 2; do for mode in --engine-process --no-engine-process; do
              STREAM_AB_ARGS="--warmup 512 $mode" stream_ab 150 512 256 "$interval"; done; done ;;
    evict73) git show 2b52de7:jaxserve/radix_index.py > /tmp/ri_old.py && cp jaxserve/radix_index.py /tmp/ri_new.py \
               || continue
             for v in new old new; do echo "== evict73: $v eviction"; cp /tmp/ri_$v.py jaxserve/radix_index.py
               STREAM_AB_ARGS="--warmup 512 --num-pages 8192 --keep-warm-cache --engine-process" stream_ab 140 512 256 8
             done; cp /tmp/ri_new.py jaxserve/radix_index.py ;;
    stream71) STREAM_AB_ARGS="--warmup 512 --no-engine-process" stream_ab 135 512 256 ;;
    proc72) (for i in 1 2 3 4 5 6; do sleep 45; echo "== gpu memory by process: $(nvidia-smi \
               --query-compute-apps=pid,used_memory --format=csv,noheader | tr '\n' ';')"; done) &
            STREAM_AB_ARGS="--warmup 512 --engine-process" stream_ab 170 512 256 1 8; \
            STREAM_AB_ARGS="--warmup 512 --no-engine-process" stream_ab 170 512 256 1 ;;
    steady71) STREAM_AB_ARGS="--warmup 512 --num-pages 8192 --keep-warm-cache --no-engine-process" \
                stream_ab 135 512 256 ;;
    first70) noise_arms 80; stream_ab 150 384 128 ;;
    noise69) noise_arms 100; \
             JAXSERVE_HASH_NOISE=1 timeout 200 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" \
               tests/test_sampling.py ;;
    yarn44) timeout 400 python3 -m pytest -q -rf -p no:cacheprovider -o addopts="" -m gpu --timeout 200 \
              tests/test_qwen_shapes.py -k "yarn or (0.5B-None-1)" ;;
    *) echo "unknown part: $part" >&2; continue ;;
  esac > "$OUT/$part/log.txt" 2>&1
  echo "== $part: rc=$? in $(( $(date +%s) - start )) s"
  grep -E "^== ab|passed|failed|^\| (7B|0.5B|jaxserve|transformers|default|prefill_first|time_share|mixed|1|64|256|64x128|8x1024) |Duration|Registers Per|Achieved Occ" \
    "$OUT/$part/log.txt" | tail -30
done
