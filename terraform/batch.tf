# AWS Batch compute environments and job queues for Metaflow steps: a CPU
# environment for data preparation and the parallel Optuna workers, and a GPU
# environment for retraining. Both scale to zero when no job is queued.

locals {
  batch_compute_type        = var.use_spot ? "SPOT" : "EC2"
  batch_allocation_strategy = var.use_spot ? "SPOT_CAPACITY_OPTIMIZED" : "BEST_FIT_PROGRESSIVE"

  batch_environments = {
    cpu = {
      instance_types = var.cpu_instance_types
      max_vcpus      = var.cpu_max_vcpus
      image_type     = "ECS_AL2023"
    }
    gpu = {
      instance_types = var.gpu_instance_types
      max_vcpus      = var.gpu_max_vcpus
      image_type     = "ECS_AL2023_NVIDIA"
    }
  }
}

# Instances require IMDSv2 with a hop limit of 1, so containers on the bridge
# network cannot read the instance role's credentials from instance metadata.
# Jobs get credentials from their job role through the ECS agent instead.
resource "aws_launch_template" "batch" {
  name_prefix = "${local.name}-batch-"
  description = "Encrypted root volume and IMDSv2 for Batch instances"

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    device_name = "/dev/xvda"

    ebs {
      volume_size           = var.batch_root_volume_size_gib
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${local.name}-batch" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = "${local.name}-batch" })
  }
}

resource "aws_batch_compute_environment" "main" {
  for_each = local.batch_environments

  # A name prefix lets create_before_destroy build the replacement environment
  # before the job queue lets go of the old one.
  name_prefix  = "${local.name}-${each.key}-"
  type         = "MANAGED"
  service_role = aws_iam_role.batch_service.arn

  compute_resources {
    type                = local.batch_compute_type
    allocation_strategy = local.batch_allocation_strategy
    instance_type       = each.value.instance_types
    min_vcpus           = 0
    max_vcpus           = each.value.max_vcpus
    instance_role       = aws_iam_instance_profile.ecs_instance.arn
    subnets             = aws_subnet.private[*].id
    security_group_ids  = [aws_security_group.batch.id]

    ec2_configuration {
      image_type = each.value.image_type
    }

    launch_template {
      launch_template_id = aws_launch_template.batch.id
      version            = aws_launch_template.batch.latest_version
    }

    tags = merge(var.tags, { Name = "${local.name}-batch-${each.key}" })
  }

  lifecycle {
    create_before_destroy = true
  }

  depends_on = [aws_iam_role_policy_attachment.batch_service]
}

# The CPU queue, the default in metaflow_config, also lists the GPU compute
# environment second, so a step with @resources(gpu=1) run with a plain
# `--with batch` finds a GPU instance instead of waiting in RUNNABLE.
locals {
  queue_environments = {
    cpu = ["cpu", "gpu"]
    gpu = ["gpu"]
  }
}

resource "aws_batch_job_queue" "main" {
  for_each = local.batch_environments

  name     = "${local.name}-${each.key}"
  state    = "ENABLED"
  priority = 1

  dynamic "compute_environment_order" {
    for_each = local.queue_environments[each.key]
    content {
      order               = compute_environment_order.key + 1
      compute_environment = aws_batch_compute_environment.main[compute_environment_order.value].arn
    }
  }
}
