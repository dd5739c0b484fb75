# SPDX-License-Identifier: Apache-2.0
#
# One haios engine for one os_root, as a Nomad batch job: the same image, the
# same command and the same files at the same paths as the Kubernetes Job in
# deploy/kubernetes/base (docs/fleet.md explains each setting).
#
# Submit from the repository root (file() reads the policy at submission):
#
#   nomad job run -var image=registry.example.com/haios:1.0.0 \
#       -var vault_addr=https://vault.example.com:8200 deploy/nomad/haios.nomad.hcl
#
# The client needs, in its agent configuration:
#   plugin "docker" { config { allow_privileged = true } }
#   client {
#     host_volume "haios-state" { path = "/var/lib/haios" }
#     host_volume "haios-kill"  { path = "/run/haios"  read_only = true }
#   }
# and the os_root as a CSI volume registered under var.os_root_volume. Keys come
# from Nomad Variables at nomad/jobs/<job id> (planner_pub, agent_pub,
# engine_pub, engine_key); the engine token from Vault through the job's
# workload identity (the vault block).
#
# Driver: docker, because it runs the same image as Kubernetes and lets the job
# ask for exactly the namespaces the engine needs. The exec driver would need
# haios and its Python environment installed on every client and builds the
# task's filesystem from the host's directories; raw_exec gives no container
# at all (the engine on the host, as without a scheduler).

variable "image" {
  type        = string
  description = "The haios image built from deploy/container/Containerfile."
  default     = "haios:1.0.0"
}

variable "vault_addr" {
  type        = string
  description = "VAULT_ADDR for the engine (https://, or http:// to loopback only)."
  default     = "https://vault.service.consul:8200"
}

variable "os_root_volume" {
  type        = string
  description = "The CSI volume holding this job's os_root."
  default     = "haios-os-root-nightly-report"
}

variable "policy_dir" {
  type        = string
  description = "The fleet policy folder, relative to where the job is submitted."
  default     = "deploy/kubernetes/base/policy"
}

# One job per os_root: the job id names the os_root.
job "haios-nightly-report" {
  type        = "batch"
  datacenters = ["*"]

  group "engine" {
    count = 1

    # The engine's own resume is the retry: never restart or reschedule the
    # task by itself (a second engine could start while the first is dying).
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    # Nomad grants the write claim of a single-node-writer volume to one
    # allocation at a time.
    volume "os_root" {
      type            = "csi"
      source          = var.os_root_volume
      access_mode     = "single-node-writer"
      attachment_mode = "file-system"
    }

    # The node's state_dir, shared by every engine on the node: the uid lease
    # pool and the os_root lock hold across them only through this directory.
    volume "state" {
      type      = "host"
      source    = "haios-state"
      read_only = false
    }

    # Operator-wide flag for the node: create /run/haios/KILL on the client.
    volume "node_kill" {
      type      = "host"
      source    = "haios-kill"
      read_only = true
    }

    task "haios" {
      driver       = "docker"
      kill_timeout = "30s"

      config {
        image = var.image
        args  = ["run", "/os_root", "--policy", "/etc/haios/policy", "--json"]

        # Root with every capability, writable cgroups, no seccomp or AppArmor
        # profile of the runtime's: the engine builds each step's sandbox itself.
        privileged = true
        # The process-events connector answers only in the initial PID,
        # network and user namespaces (haios/sandbox/treewatch.py).
        pid_mode     = "host"
        network_mode = "host"
        userns_mode  = "host"

        # One bind mount per policy file, onto root-owned 0755 directories of
        # the image: the policy loader refuses symlinks and group- or
        # other-writable directories. Relative sources are in the task dir.
        mount {
          type     = "bind"
          source   = "local/policy/policy.toml"
          target   = "/etc/haios/policy/policy.toml"
          readonly = true
        }

        mount {
          type     = "bind"
          source   = "local/policy/profiles/default.toml"
          target   = "/etc/haios/policy/profiles/default.toml"
          readonly = true
        }

        mount {
          type     = "bind"
          source   = "local/policy/profiles/network.toml"
          target   = "/etc/haios/policy/profiles/network.toml"
          readonly = true
        }

        mount {
          type     = "bind"
          source   = "local/policy/keys/planner.pub.pem"
          target   = "/etc/haios/policy/keys/planner.pub.pem"
          readonly = true
        }

        mount {
          type     = "bind"
          source   = "local/policy/keys/agent.pub.pem"
          target   = "/etc/haios/policy/keys/agent.pub.pem"
          readonly = true
        }

        mount {
          type     = "bind"
          source   = "local/policy/keys/engine.pub.pem"
          target   = "/etc/haios/policy/keys/engine.pub.pem"
          readonly = true
        }

        mount {
          type     = "bind"
          source   = "secrets/engine.pem"
          target   = "/etc/haios/engine-key/engine.pem"
          readonly = true
        }
      }

      volume_mount {
        volume      = "os_root"
        destination = "/os_root"
      }

      volume_mount {
        volume      = "state"
        destination = "/var/lib/haios"
      }

      volume_mount {
        volume      = "node_kill"
        destination = "/run/haios"
        read_only   = true
      }

      env {
        VAULT_ADDR = var.vault_addr
      }

      # VAULT_TOKEN: a token Nomad obtains for this task through its workload
      # identity and renews while the task runs; it must be allowed to create
      # child tokens (docs/fleet.md, "Vault"). noop: a new token must never
      # restart a batch run.
      vault {
        role        = "haios-engine"
        change_mode = "noop"
      }

      # The policy files, verbatim (they hold no template delimiters).
      template {
        data        = file("${var.policy_dir}/policy.toml")
        destination = "local/policy/policy.toml"
        perms       = "0444"
        change_mode = "noop"
      }

      template {
        data        = file("${var.policy_dir}/default.toml")
        destination = "local/policy/profiles/default.toml"
        perms       = "0444"
        change_mode = "noop"
      }

      template {
        data        = file("${var.policy_dir}/network.toml")
        destination = "local/policy/profiles/network.toml"
        perms       = "0444"
        change_mode = "noop"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/haios-nightly-report\" }}{{ .planner_pub }}{{ end }}"
        destination = "local/policy/keys/planner.pub.pem"
        perms       = "0444"
        change_mode = "noop"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/haios-nightly-report\" }}{{ .agent_pub }}{{ end }}"
        destination = "local/policy/keys/agent.pub.pem"
        perms       = "0444"
        change_mode = "noop"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/haios-nightly-report\" }}{{ .engine_pub }}{{ end }}"
        destination = "local/policy/keys/engine.pub.pem"
        perms       = "0444"
        change_mode = "noop"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/haios-nightly-report\" }}{{ .engine_key }}{{ end }}"
        destination = "secrets/engine.pem"
        perms       = "0400"
        change_mode = "noop"
      }

      # Steps run inside this task's cgroup (the image's entrypoint delegates
      # it): the memory covers the engine and its steps (one at a time with the
      # shipped profiles' 1 GiB each).
      resources {
        cpu    = 1000
        memory = 2048
      }
    }
  }
}
