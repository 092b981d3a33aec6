# ECR repositories for the GPU training image (Metaflow Batch steps and
# SageMaker training jobs) and the serving image (SageMaker endpoint).

resource "aws_ecr_repository" "main" {
  for_each = toset(["training", "serving"])

  name                 = "${local.name}-${each.key}"
  image_tag_mutability = "IMMUTABLE"

  # While false, terraform destroy fails on a repository that holds images.
  force_delete = var.force_destroy

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.main.arn
  }
}

# Keeps the 30 newest images per repository, so old immutable tags do not
# accumulate storage cost.
resource "aws_ecr_lifecycle_policy" "main" {
  for_each = aws_ecr_repository.main

  repository = each.value.name
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Expire all but the 30 newest images"
        selection = {
          tagStatus   = "any"
          countType   = "imageCountMoreThan"
          countNumber = 30
        }
        action = {
          type = "expire"
        }
      },
    ]
  })
}
