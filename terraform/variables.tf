variable "region" {
  description = "AWS region for every resource, for example us-east-1."
  type        = string
  default     = "us-east-1"
}

variable "name_prefix" {
  description = "Prefix for resource names. Lowercase letters, digits and hyphens, at most 20 characters, so the S3 bucket name stays under 63 characters."
  type        = string
  default     = "tabmodel"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,19}$", var.name_prefix))
    error_message = "name_prefix must start with a lowercase letter and contain 2 to 20 lowercase letters, digits or hyphens."
  }
}

variable "tags" {
  description = "Tags applied to every resource through the provider's default_tags."
  type        = map(string)
  default = {
    Project   = "tabmodel"
    ManagedBy = "terraform"
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC. Terraform splits it into two public and two private subnets."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be a valid IPv4 CIDR block, for example 10.40.0.0/16."
  }
}

variable "availability_zones" {
  description = "Exactly two availability zone names for the subnets, for example [\"us-east-1a\", \"us-east-1b\"]. An empty list picks the first two zones of the region in sorted order. Both zones must offer the GPU instance types."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.availability_zones) == 0 || length(var.availability_zones) == 2
    error_message = "availability_zones must be empty or list exactly two zone names."
  }
}

variable "single_nat_gateway" {
  description = "true creates one NAT gateway shared by both private subnets (cheaper). false creates one per availability zone, so losing one zone does not cut the other zone's internet access."
  type        = bool
  default     = true
}

variable "allowed_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach the Metaflow metadata service and UI load balancer, for example your office or VPN range."
  type        = list(string)

  validation {
    condition     = length(var.allowed_cidrs) > 0 && alltrue([for cidr in var.allowed_cidrs : can(cidrhost(cidr, 0))])
    error_message = "allowed_cidrs must contain at least one valid IPv4 CIDR block, for example [\"203.0.113.0/24\"]."
  }
}

variable "certificate_arn" {
  description = "ARN of an ACM certificate for the load balancer. When set, the listeners use HTTPS on ports 443 (UI) and 8443 (metadata service). When null, they use plain HTTP on ports 80 and 8080."
  type        = string
  default     = null
}

variable "gpu_instance_types" {
  description = "EC2 instance types for the GPU Batch compute environment. Each must have an NVIDIA GPU."
  type        = list(string)
  default     = ["g5.xlarge", "g4dn.xlarge"]

  validation {
    condition     = length(var.gpu_instance_types) > 0 && alltrue([for t in var.gpu_instance_types : can(regex("^(g4dn|g5|g5g|g6|g6e|gr6|p3|p4d|p4de|p5)\\.", t))])
    error_message = "gpu_instance_types must list NVIDIA GPU instance types such as g5.xlarge or g4dn.xlarge."
  }
}

variable "cpu_instance_types" {
  description = "EC2 instance types (or families such as m6i) for the CPU Batch compute environment."
  type        = list(string)
  default     = ["m6i", "c6i"]
}

variable "use_spot" {
  description = "true runs Batch jobs on Spot instances (SPOT_CAPACITY_OPTIMIZED), false on On-Demand instances (BEST_FIT_PROGRESSIVE)."
  type        = bool
  default     = true
}

variable "gpu_max_vcpus" {
  description = "Maximum vCPUs the GPU compute environment may run at once. A g5.xlarge has 4 vCPUs."
  type        = number
  default     = 16
}

variable "cpu_max_vcpus" {
  description = "Maximum vCPUs the CPU compute environment may run at once. Parallel Optuna workers run here."
  type        = number
  default     = 64
}

variable "batch_root_volume_size_gib" {
  description = "Size in GiB of the encrypted root volume of Batch instances. The GPU training image with CUDA needs room for image layers."
  type        = number
  default     = 100
}

variable "aurora_engine_version" {
  description = "Aurora MySQL engine version for the Optuna study database."
  type        = string
  default     = "8.0.mysql_aurora.3.08.2"
}

variable "aurora_min_capacity" {
  description = "Minimum Aurora Serverless v2 capacity in ACUs (0.5 to 256). 0 lets the cluster pause when idle on engine versions that support auto-pause (Aurora MySQL 3.08.0 and later)."
  type        = number
  default     = 0.5

  validation {
    condition     = var.aurora_min_capacity >= 0 && var.aurora_min_capacity <= 256
    error_message = "aurora_min_capacity must be between 0 and 256 ACUs."
  }
}

variable "aurora_max_capacity" {
  description = "Maximum Aurora Serverless v2 capacity in ACUs (1 to 256)."
  type        = number
  default     = 4

  validation {
    condition     = var.aurora_max_capacity >= 1 && var.aurora_max_capacity <= 256
    error_message = "aurora_max_capacity must be between 1 and 256 ACUs."
  }
}

variable "aurora_database_name" {
  description = "Name of the database that holds the Optuna study."
  type        = string
  default     = "optuna"
}

variable "aurora_master_username" {
  description = "Master user of the Aurora cluster. RDS generates the password and stores it in Secrets Manager."
  type        = string
  default     = "optuna_admin"
}

variable "backup_retention_days" {
  description = "Days of automated backups kept for the Aurora cluster and the metadata PostgreSQL instance."
  type        = number
  default     = 7
}

variable "deletion_protection" {
  description = "Deletion protection for the Aurora cluster, the metadata database and the load balancer. Set to false and apply before terraform destroy."
  type        = bool
  default     = true
}

variable "force_destroy" {
  description = "Let terraform destroy delete the datastore bucket and the ECR repositories while they still hold objects or images. Keep false until you mean to destroy the stack."
  type        = bool
  default     = false
}

variable "metadata_db_instance_class" {
  description = "RDS instance class of the PostgreSQL database behind the Metaflow metadata service."
  type        = string
  default     = "db.t4g.micro"
}

variable "metadata_db_engine_version" {
  description = "PostgreSQL major version of the metadata database."
  type        = string
  default     = "16"
}

variable "metadata_db_multi_az" {
  description = "Run the metadata PostgreSQL instance as Multi-AZ (about twice the instance cost)."
  type        = bool
  default     = false
}

variable "metaflow_service_image" {
  description = "Container image of the Metaflow metadata service. The same image runs the UI backend, which also serves the bundled UI."
  type        = string
  default     = "netflixoss/metaflow_metadata_service:v2.5.0"
}

variable "training_image_tag" {
  description = "Tag of the training image in the training ECR repository that Metaflow Batch steps and SageMaker training jobs run. Tags are immutable, so every build needs a new tag."
  type        = string
  default     = "0.1.0"
}

variable "serving_image_tag" {
  description = "Tag of the serving image in the serving ECR repository that the SageMaker endpoint runs. Tags are immutable, so every build needs a new tag."
  type        = string
  default     = "0.1.0"
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps logs of the metadata service, VPC flow logs and databases."
  type        = number
  default     = 365
}
