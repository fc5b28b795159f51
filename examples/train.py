#!/usr/bin/env python
"""Fine-tune MetaSeg for semantic segmentation with Accelerate (one GPU, many GPUs, or CPU).

The official MetaSeg recipe (`metaseg_hf.presets.OFFICIAL_TRAINING_RECIPE`) is the default: AdamW
6e-5, weight decay 0.01, decode head at 10x the learning rate, no decay on the encoder's norm layers,
linear warm-up then polynomial decay, MMSegmentation's augmentation. Every knob is a flag.

    # the embedded demo: MetaSeg-T from scratch on synthetic scenes (a few minutes on a CPU)
    accelerate launch examples/train.py --output_dir runs/demo

    # ADE20K from ImageNet MSCAN weights, 8 GPUs, bf16
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 examples/train.py \
        --config_name metaseg-t --backbone_checkpoint mscan_t.pth \
        --train_dir data/ADEChallengeData2016 --dataset_format ade20k --output_dir runs/metaseg-t-ade20k

    # resume after a crash or preemption
    accelerate launch examples/train.py ... --resume_from_checkpoint latest

Steps: parse args -> Accelerator -> data -> model -> optimizer/scheduler -> prepare -> resume ->
train loop (`accelerator.accumulate`) with checkpoints and evaluation -> save model, processor,
results and model card -> push to the Hub.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import metaseg_hf  # noqa: F401  (registers MetaSeg with the Auto classes)
from metaseg_hf.checkpoints import (
    read_training_state,
    remove_incomplete_checkpoints,
    resolve_checkpoint,
    restore_scheduler,
    save_checkpoint,
    scheduler_state,
)
from metaseg_hf.data import (
    DATASET_FORMATS,
    DataError,
    EpochSampler,
    SegmentationEvalDataset,
    SegmentationTrainDataset,
    check_labels,
    load_segmentation_data,
    train_augmentation,
)
from metaseg_hf.evaluation import evaluate_segmentation
from metaseg_hf.hub import push_folder_to_hub, recorded_command, training_card_sections, write_model_card
from metaseg_hf.metrics import StreamingMeanIoU, format_results_table, results_to_json
from metaseg_hf.presets import OFFICIAL_TRAINING_RECIPE
from metaseg_hf.synthetic import SYNTHETIC_DEMO_RECIPE, SYNTHETIC_IMAGE_SIZE
from metaseg_hf.training import (
    build_image_processor,
    build_model,
    create_optimizer,
    create_scheduler,
    set_cpu_threads,
)

RECIPE_FLAGS = ("learning_rate", "weight_decay", "lr_scheduler_type", "num_warmup_steps", "max_train_steps",
                "adam_beta1", "adam_beta2", "head_lr_multiplier", "warmup_ratio", "poly_power", "semantic_loss_average")


def parse_args(argv=None):
    recipe = OFFICIAL_TRAINING_RECIPE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data (nothing named: the synthetic scenes demo)")
    data.add_argument("--dataset_name", help="a `datasets` Hub id or a save_to_disk folder")
    data.add_argument("--train_dir", help="training folder (imagefolder) or dataset root (ade20k, cityscapes)")
    data.add_argument("--validation_dir", help="validation folder (imagefolder) or another dataset root")
    data.add_argument("--dataset_format", choices=DATASET_FORMATS, default="imagefolder", help="layout of --train_dir")
    data.add_argument("--do_reduce_labels", action=argparse.BooleanOptionalAction, default=None,
                      help="label 0 means 'other': ignore it and shift the others down (default: per dataset, on for ADE20K)")
    data.add_argument("--train_val_split", type=float, default=0.15, help="held-out fraction when there is no validation split")
    data.add_argument("--image_column_name", help="image column of --dataset_name (found by name otherwise)")
    data.add_argument("--label_column_name", help="label column of --dataset_name (found by name otherwise)")
    data.add_argument("--crop_size", type=int, help="training crop side (default: the test size's short side, 512 for ADE20K)")
    data.add_argument("--dataloader_num_workers", type=int,
                      help="data loading processes, for training crops and validation images (default: 0 on CPU, 4 otherwise)")
    data.add_argument("--check_labels", action="store_true",
                      help="read every label (and image size) before training and list all bad ones at once, "
                           "instead of stopping when a bad sample is drawn")
    data.add_argument("--num_threads", type=int,
                      help="torch threads of a single CPU process (default: all cores, also under `accelerate launch`, "
                           "which otherwise leaves one; OMP_NUM_THREADS other than 1 is kept)")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="a MetaSeg folder or Hub id to start from")
    model.add_argument("--config_name", help="train from scratch: a preset (metaseg-t, metaseg-b, metaseg-t-ade20k, ...) or a config file")
    model.add_argument("--backbone_checkpoint", help="ImageNet MSCAN weights for the encoder (official .pth or converted folder)")
    model.add_argument("--trust_remote_code", action="store_true", help="allow model code from the Hub")
    model.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across GPUs (multi-GPU runs)")

    optim = parser.add_argument_group("optimisation (defaults: the official recipe; the synthetic demo has its own)")
    optim.add_argument("--per_device_train_batch_size", type=int,
                       help=f"default: the official total batch ({recipe['total_batch_size']}) / (processes x accumulation)")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, help=f"AdamW learning rate (official {recipe['learning_rate']})")
    optim.add_argument("--head_lr_multiplier", type=float, help=f"decode head learning-rate factor (official {recipe['head_lr_multiplier']})")
    optim.add_argument("--weight_decay", type=float, help=f"AdamW weight decay (official {recipe['weight_decay']})")
    optim.add_argument("--adam_beta1", type=float)
    optim.add_argument("--adam_beta2", type=float)
    optim.add_argument("--lr_scheduler_type", help="'polynomial' (official MMCV warm-up + poly) or a Transformers scheduler name")
    optim.add_argument("--num_warmup_steps", type=int, help=f"official {recipe['num_warmup_steps']}")
    optim.add_argument("--warmup_ratio", type=float, help="polynomial schedule: warm-up starts at this fraction of the lr")
    optim.add_argument("--poly_power", type=float)
    optim.add_argument("--max_train_steps", type=int, help=f"optimizer steps (official {recipe['max_train_steps']}); overrides epochs")
    optim.add_argument("--num_train_epochs", type=int, help="used when --max_train_steps is not given")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--max_grad_norm", type=float, help="clip gradients to this norm (off in the official recipe)")
    optim.add_argument("--semantic_loss_average", choices=("valid_pixels", "all_pixels"),
                       help=f"cross-entropy average (official {recipe['semantic_loss_average']!r})")
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("checkpoints, evaluation, logging, Hub")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--checkpointing_steps", help="save the training state every N steps, or 'epoch'")
    run.add_argument("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    run.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' (newest complete one in --output_dir)")
    run.add_argument("--eval_steps", type=int, help="evaluate every N steps (always at the end)")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--with_tracking", action="store_true", help="log to the trackers of --report_to")
    run.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, ... or 'all'")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", help="repository (default: your namespace / the output folder's name)")
    run.add_argument("--hub_token")
    run.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    if args.dataset_name and args.train_dir:
        parser.error("give either --dataset_name or --train_dir, not both")
    if args.validation_dir and not args.train_dir:
        parser.error("--validation_dir needs --train_dir")
    if args.checkpointing_steps not in (None, "epoch") and not str(args.checkpointing_steps).isdigit():
        parser.error(f"--checkpointing_steps must be a number of steps or 'epoch', got {args.checkpointing_steps!r}")
    return args


def resolve_recipe(args, synthetic: bool) -> dict:
    """The official recipe, the demo's overrides when training on the synthetic scenes, then the flags."""
    recipe = dict(OFFICIAL_TRAINING_RECIPE)
    if synthetic:
        recipe.update(SYNTHETIC_DEMO_RECIPE)
    for name in RECIPE_FLAGS:
        if getattr(args, name) is not None:
            recipe[name] = getattr(args, name)
    return recipe


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)

    # 1. Accelerator: devices, processes, mixed precision (from `accelerate launch`), trackers.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=str(output_dir),
    )
    set_cpu_threads(accelerator, args.num_threads)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete_checkpoints(output_dir)
    accelerator.wait_for_everyone()

    # 2. Data: splits, class names, label reduction.
    synthetic = not (args.dataset_name or args.train_dir)
    with accelerator.main_process_first():
        data = load_segmentation_data(
            dataset_name=args.dataset_name, train_dir=args.train_dir, validation_dir=args.validation_dir,
            dataset_format=args.dataset_format, do_reduce_labels=args.do_reduce_labels, train_val_split=args.train_val_split,
            image_column=args.image_column_name, label_column=args.label_column_name, seed=args.seed, token=args.hub_token,
        )
        if args.check_labels:
            checked = sum(check_labels(split, data.num_labels, data.do_reduce_labels)
                          for split in (data.train, data.validation) if split is not None)
            accelerator.print(f"Checked {checked} labels: every value is a class id or ignored, every size matches its image")
    recipe = resolve_recipe(args, synthetic)
    accelerator.print(f"Data: {data.description}: {len(data.train)} training and "
                      f"{len(data.validation) if data.validation is not None else 0} validation images, {data.num_labels} classes")

    # 3. Model and image processor; the classifier follows the data's labels.
    model = build_model(
        data.id2label, model_name_or_path=args.model_name_or_path, config_name=args.config_name,
        backbone_checkpoint=args.backbone_checkpoint, trust_remote_code=args.trust_remote_code, token=args.hub_token,
        semantic_loss_average=recipe["semantic_loss_average"],
    )
    image_processor = build_image_processor(
        args.model_name_or_path, data.dataset_format, data.do_reduce_labels,
        image_size=SYNTHETIC_IMAGE_SIZE if synthetic else None, token=args.hub_token,
    )
    if args.sync_bn and accelerator.num_processes > 1 and accelerator.device.type != "cpu":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn:
        accelerator.print("--sync_bn ignored: it needs several GPU processes (SyncBatchNorm has no CPU backend)")
    set_seed(args.seed + accelerator.process_index)  # same weights everywhere, different dropout per process

    # 4. Data loaders: augmented crops (per-sample randomness from seed, epoch, index) and validation images.
    crop_size = args.crop_size or recipe.get("crop_size") or image_processor.size["shortest_edge"]
    total_batch_size = recipe["total_batch_size"]
    per_device_batch_size = args.per_device_train_batch_size or max(
        1, total_batch_size // (accelerator.num_processes * args.gradient_accumulation_steps)
    )
    if per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps != total_batch_size:
        accelerator.print(f"Note: {per_device_batch_size} crops x {accelerator.num_processes} processes x "
                          f"{args.gradient_accumulation_steps} accumulation steps differs from the recipe's total batch of {total_batch_size}")
    train_dataset = SegmentationTrainDataset(
        data.train, train_augmentation(image_processor, crop_size, recipe), data.num_labels, data.do_reduce_labels, args.seed
    )
    if len(train_dataset) < per_device_batch_size * accelerator.num_processes:
        raise SystemExit(f"{len(train_dataset)} training images are fewer than one batch "
                         f"({per_device_batch_size} x {accelerator.num_processes} processes)")
    sampler = EpochSampler(len(train_dataset), seed=args.seed)
    num_workers = args.dataloader_num_workers
    if num_workers is None:
        num_workers = 0 if accelerator.device.type == "cpu" else 4
    train_dataloader = DataLoader(
        train_dataset, batch_size=per_device_batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
        pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed),
    )
    eval_dataset = (
        SegmentationEvalDataset(data.validation, image_processor, data.num_labels, data.do_reduce_labels)
        if data.validation is not None else None
    )

    # 5. Optimizer (official parameter groups) and schedule.
    optimizer = create_optimizer(
        model, learning_rate=recipe["learning_rate"], weight_decay=recipe["weight_decay"],
        head_lr_multiplier=recipe["head_lr_multiplier"], no_decay_on_norms=recipe["no_decay_on_norms"],
        betas=(recipe["adam_beta1"], recipe["adam_beta2"]),
    )

    # 6. prepare: DDP / FSDP / DeepSpeed wrapping, device placement, data sharding, autocast.
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None and args.num_train_epochs is not None:
        max_train_steps = args.num_train_epochs * steps_per_epoch
    else:
        max_train_steps = recipe["max_train_steps"]
    num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)
    scheduler = create_scheduler(
        optimizer, recipe["lr_scheduler_type"], recipe["num_warmup_steps"], max_train_steps,
        recipe["warmup_ratio"], recipe["poly_power"],
    )
    # The scheduler (stepped by us once per optimizer step) is saved as plain data in the checkpoint's marker,
    # not registered with Accelerate, which would pickle it and unpickle it unsafely on resume.
    hyperparameters = {
        "initialisation": args.model_name_or_path or f"{args.config_name or 'metaseg-t'} from scratch"
        + (f" + encoder {Path(args.backbone_checkpoint).name}" if args.backbone_checkpoint else ""),
        "optimizer": f"AdamW (betas {recipe['adam_beta1']}, {recipe['adam_beta2']})",
        "learning_rate": recipe["learning_rate"],
        "head_lr_multiplier": recipe["head_lr_multiplier"],
        "weight_decay": recipe["weight_decay"],
        "no_decay_on_encoder_norms": recipe["no_decay_on_norms"],
        "lr_scheduler_type": recipe["lr_scheduler_type"],
        "num_warmup_steps": recipe["num_warmup_steps"],
        "warmup_ratio": recipe["warmup_ratio"],
        "poly_power": recipe["poly_power"],
        "max_train_steps": max_train_steps,
        "per_device_train_batch_size": per_device_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "total_batch_size": per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "crop_size": crop_size,
        "scale_range": str(tuple(recipe["scale_range"])),
        "cat_max_ratio": recipe["cat_max_ratio"],
        "flip_probability": recipe["flip_probability"],
        "photometric_distortion": recipe["photometric_distortion"],
        "semantic_loss_average": recipe["semantic_loss_average"],
        "max_grad_norm": args.max_grad_norm,
        "mixed_precision": accelerator.mixed_precision,
        "seed": args.seed,
    }
    if args.with_tracking:
        accelerator.init_trackers("metaseg", config={key: value for key, value in hyperparameters.items() if value is not None})

    # 7. Resume: weights, optimizer, scheduler, RNG states, then the same step and data position.
    completed_steps, starting_epoch, skip_batches = 0, 0, 0
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    if checkpoint is not None:
        state = read_training_state(checkpoint)  # first: it refuses a checkpoint that load_state would unpickle unsafely
        accelerator.load_state(str(checkpoint))
        restore_scheduler(scheduler, state)
        completed_steps, starting_epoch, skip_batches = state["completed_steps"], state["epoch"], state["batches_in_epoch"]
        if skip_batches >= len(train_dataloader):
            starting_epoch, skip_batches = starting_epoch + 1, 0
        accelerator.print(f"Resumed from {checkpoint} at step {completed_steps} (epoch {starting_epoch}, batch {skip_batches})")
    elif args.resume_from_checkpoint:
        accelerator.print(f"No complete checkpoint in {output_dir} yet: starting from scratch")

    accelerator.print(
        f"Training {max_train_steps} steps ({num_train_epochs} epochs of {steps_per_epoch}) on {accelerator.num_processes} "
        f"process(es), {hyperparameters['total_batch_size']} crops of {crop_size} per step, mixed precision "
        f"{accelerator.mixed_precision}"
    )
    progress_bar = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    checkpoint_every = int(args.checkpointing_steps) if str(args.checkpointing_steps).isdigit() else None
    running_loss, loss_count, last_loss = torch.zeros((), device=accelerator.device), 0, None
    eval_results = None

    def checkpoint_now(epoch, batches_in_epoch):
        save_checkpoint(
            accelerator, output_dir, completed_steps,
            {"completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
             "scheduler": scheduler_state(scheduler)},
            total_limit=args.checkpoints_total_limit,
        )

    def evaluate():
        metric = StreamingMeanIoU(data.num_labels, id2label=data.id2label, device=accelerator.device)
        synced = evaluate_segmentation(model, eval_dataset, accelerator, metric, args.per_device_eval_batch_size, num_workers)
        return synced.compute()

    # 8. The training loop.
    model.train()
    for epoch in range(starting_epoch, num_train_epochs):
        if completed_steps >= max_train_steps:
            break
        sampler.epoch = epoch
        batch_index = skip_batches if epoch == starting_epoch else 0
        active_dataloader = (
            accelerator.skip_first_batches(train_dataloader, batch_index) if batch_index else train_dataloader
        )
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            running_loss += outputs.loss.detach().float()
            loss_count += 1
            batch_index += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            completed_steps += 1
            progress_bar.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == max_train_steps:
                last_loss = accelerator.reduce(running_loss / loss_count, reduction="mean").item()
                running_loss.zero_()
                loss_count = 0
                lr = scheduler.get_last_lr()[0]
                progress_bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                if args.with_tracking:
                    accelerator.log({"train/loss": last_loss, "train/learning_rate": lr, "train/epoch": epoch}, step=completed_steps)
            if checkpoint_every and completed_steps % checkpoint_every == 0:
                checkpoint_now(epoch, batch_index)
            if args.eval_steps and eval_dataset is not None and completed_steps % args.eval_steps == 0 and completed_steps < max_train_steps:
                eval_results = evaluate()
                accelerator.print(f"step {completed_steps}: validation mIoU {100 * eval_results['mean_iou']:.2f}")
                if args.with_tracking:
                    accelerator.log({f"eval/{key}": eval_results[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}, step=completed_steps)
            if completed_steps >= max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            checkpoint_now(epoch, batch_index)
    progress_bar.close()
    train_runtime = time.time() - start_time

    # 9. Final evaluation on the validation split.
    if eval_dataset is not None:
        eval_results = evaluate()
        accelerator.print(format_results_table(eval_results))
        if args.with_tracking:
            accelerator.log({f"eval/{key}": eval_results[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}, step=completed_steps)

    # 10. Save the pipeline-ready model, the image processor, the results and the model card.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    results = {
        "train_steps": completed_steps,
        "train_loss": last_loss,
        "train_runtime_s": round(train_runtime, 1),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
    }
    if eval_results is not None:
        json_results = results_to_json(eval_results)
        results.update({f"eval_{key}": json_results[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")})
        results["eval_per_class"] = json_results["per_class"]
    if accelerator.is_main_process:
        image_processor.save_pretrained(output_dir)
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        command = recorded_command("accelerate launch examples/train.py", argv if argv is not None else sys.argv[1:],
                                   secrets=[args.hub_token])
        sections = training_card_sections(data.description, data.id2label, hyperparameters, eval_results, command)
        title = args.hub_model_id.split("/")[-1] if args.hub_model_id else output_dir.name
        write_model_card(output_dir, unwrapped.config, title, sections, datasets=[data.hub_dataset_id] if data.hub_dataset_id else None)
        accelerator.print(f"Saved the model, image processor, all_results.json and README.md to {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group

    # 11. Push the folder (without checkpoints) to the Hub; a failure leaves the local output intact.
    if args.push_to_hub and accelerator.is_main_process:
        try:
            url = push_folder_to_hub(  # the final model files only: no checkpoint-*/ nor logs
                output_dir, args.hub_model_id or output_dir.resolve().name, token=args.hub_token,
                private=args.hub_private_repo, ignore_patterns=["*/*"],
            )
        except Exception as error:  # network, authentication, permissions: report, keep the local files
            print(f"Upload to the Hub failed ({type(error).__name__}: {error}). The trained model is complete in "
                  f"{output_dir}; upload it later with metaseg_hf.hub.push_folder_to_hub.", file=sys.stderr)
            return 1
        print(f"Uploaded to {url}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as error:  # bad data: the message names the file and the fix; no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
