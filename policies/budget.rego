# METADATA
# title: Tenant budgets
# description: The estimated monthly cost of a tenant's VMs (prices per SLA class in data.cairn_prices, policies/data/prices.json; per vCPU, GiB of memory and GiB of storage; FT VMs pay for their secondary) stays within the tenant's budget.
# custom:
#   enforcement: soft-mandatory
package cairn.budget

import rego.v1

gib := 1073741824

prices := data.cairn_prices

# VM name -> instances holding compute. With a placement: the placed primary
# and secondary, in one pass over it (a VM it does not name costs no compute:
# none below). Without: one, two for FT. Looked up per VM rather than a
# function called per VM, which made this policy the slowest at 10,000 VMs.
instance_count := {p.name: n |
	some p in input.placement.vms
	n := count([x | some x in [p.node, object.get(p, "secondary", null)]; x != null])
} if {
	input.placement
} else := {vm.name: instances_without_placement(vm) | some vm in input.vms}

instances_without_placement(vm) := 2 if {
	vm.availability == "ft"
} else := 1

# Tenant name -> {[vm name, cost]}: one pass over the VMs (a comprehension
# per tenant would be tenants x VMs). The monthly cost of a VM: compute
# (vCPUs and memory) per instance, plus its disks' storage once.
vm_costs[tenant] contains [vm.name, cost] if {
	some vm in input.vms
	tenant := vm.tenant
	p := prices.per_month[vm.sla.class]
	storage_gib := sum([d.size_bytes | some d in vm.disks]) / gib
	compute := vm.cpu * p.vcpu + (vm.memory_bytes / gib) * p.memory_gib
	cost := (object.get(instance_count, vm.name, 0) * compute) + (storage_gib * p.storage_gib)
}

# Tenant name -> estimated monthly cost, rounded to cents.
tenant_cost[name] := round(sum([c | some [_, c] in object.get(vm_costs, name, set())]) * 100) / 100 if {
	some tenant in input.tenants
	name := tenant.name
}

deny contains "policy data cairn_prices is missing: add policies/data/prices.json" if {
	not prices.per_month
}

deny contains msg if {
	some vm in input.vms
	prices.per_month
	not prices.per_month[vm.sla.class]
	msg := sprintf("vm %s: no price for SLA class %s in policies/data/prices.json, so its cost is unknown", [vm.name, vm.sla.class])
}

deny contains msg if {
	some tenant in input.tenants
	tenant.budget != null
	tenant.budget.currency == prices.currency
	cost := tenant_cost[tenant.name]
	cost > tenant.budget.monthly
	msg := sprintf("tenant %s: estimated monthly cost %v %s is over its budget of %v %s", [tenant.name, cost, prices.currency, tenant.budget.monthly, tenant.budget.currency])
}

warn contains msg if {
	some tenant in input.tenants
	tenant.budget != null
	tenant.budget.currency == prices.currency
	cost := tenant_cost[tenant.name]
	cost <= tenant.budget.monthly
	cost > prices.warn_at * tenant.budget.monthly
	msg := sprintf("tenant %s: estimated monthly cost %v %s is %v%% of its budget of %v %s", [tenant.name, cost, prices.currency, round((cost * 100) / tenant.budget.monthly), tenant.budget.monthly, tenant.budget.currency])
}

warn contains msg if {
	some tenant in input.tenants
	tenant.budget != null
	tenant.budget.currency != prices.currency
	msg := sprintf("tenant %s: budget is in %s but prices are in %s; the budget is not checked", [tenant.name, tenant.budget.currency, prices.currency])
}
