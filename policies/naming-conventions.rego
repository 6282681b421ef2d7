# METADATA
# title: Naming and tagging conventions
# description: Tag keys are lower-case; a `tier` tag names a known tier; every VM says which application it belongs to.
# custom:
#   enforcement: soft-mandatory
package cairn.naming

import rego.v1

tiers := {"web", "app", "db", "cache", "batch", "infra"}

deny contains msg if {
	some vm in input.vms
	some key, _ in vm.tags
	key != lower(key)
	msg := sprintf("vm %s: tag key `%s` must be lower-case (write `%s`)", [vm.name, key, lower(key)])
}

deny contains msg if {
	some vm in input.vms
	tier := vm.tags.tier
	not tier in tiers
	msg := sprintf("vm %s: tag tier=%s is not a known tier (one of %s)", [vm.name, tier, concat(", ", sort(tiers))])
}

deny contains msg if {
	some vm in input.vms
	count(vm.name) > 40
	msg := sprintf("vm %s: names longer than 40 characters do not fit dashboards and DNS records (%d)", [vm.name, count(vm.name)])
}

warn contains msg if {
	some vm in input.vms
	not vm.tags.app
	msg := sprintf("vm %s: has no `app` tag; tag every VM with the application it belongs to (tag \"app\" \"NAME\")", [vm.name])
}
