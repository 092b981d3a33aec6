terraform {
  required_version = ">= 1.6"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_region" "current" {}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Only the first two zone names in sorted order are used, and AWS names a new zone with a later letter, so a new zone does not change the subnets. var.availability_zones overrides the choice.
}

locals {
  name       = var.name_prefix
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.region
  azs = (
    length(var.availability_zones) > 0
    ? var.availability_zones
    : slice(sort(data.aws_availability_zones.available.names), 0, 2)
  )
}
