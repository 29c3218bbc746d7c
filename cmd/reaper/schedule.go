package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/pglease/pglease/reaper"
)

// cronField is one field of a cron expression and the values it takes.
type cronField struct {
	name     string // as a message names it
	min, max int
	extra    string // other accepted values, for the message
}

var (
	secondField = cronField{"second", 0, 59, ""}
	cronFields  = []cronField{
		{"minute", 0, 59, ""},
		{"hour", 0, 23, ""},
		{"day-of-month", 1, 31, ", or ?"},
		{"month", 1, 12, ", or JAN to DEC"},
		{"day-of-week", 0, 6, " (0 is Sunday), or SUN to SAT, or ?"},
	}
)

const scheduleHelp = `use a cron expression such as "*/5 * * * *" (minute hour day-of-month month day-of-week, ` +
	`optionally preceded by a seconds field and by CRON_TZ=Zone/Name) or a descriptor such as "@hourly" or "@every 30s"`

// checkSchedule refuses a schedule whose fields are out of range, naming the
// field and its range, and then asks the reaper whether it can run it. The
// cron parser checks values but not steps: it takes "*/61 * * * *" and runs
// it at minute 0 of every hour.
func checkSchedule(spec string) error {
	s := strings.TrimSpace(spec)
	if tz, rest, ok := strings.Cut(s, " "); ok && (strings.HasPrefix(tz, "CRON_TZ=") || strings.HasPrefix(tz, "TZ=")) {
		s = strings.TrimSpace(rest)
	}
	if fields := strings.Fields(s); !strings.HasPrefix(s, "@") && (len(fields) == 5 || len(fields) == 6) {
		specs := cronFields
		if len(fields) == 6 {
			specs = append([]cronField{secondField}, cronFields...)
		}
		for i, f := range fields {
			if why := specs[i].check(f); why != "" {
				return usagef("--schedule: invalid schedule %q: %s; %s", spec, why, scheduleHelp)
			}
		}
	}
	if err := reaper.ValidateSchedule(spec); err != nil {
		return usagef("--schedule: %s", strings.TrimPrefix(err.Error(), "reaper: "))
	}
	return nil
}

// check returns what is wrong with one field's text, or "". Names (MON,
// JAN) are left to the cron parser, which knows them.
func (c cronField) check(field string) string {
	span := fmt.Sprintf("%s values are %d to %d%s", c.name, c.min, c.max, c.extra)
	for _, part := range strings.Split(field, ",") {
		rng, step, hasStep := strings.Cut(part, "/")
		if hasStep {
			n, err := strconv.Atoi(step)
			if err != nil || n < 1 || n > c.max-c.min {
				return fmt.Sprintf("the %s step %q is out of range: use a step of 1 to %d (%s)",
					c.name, step, c.max-c.min, span)
			}
		}
		if rng == "*" || rng == "?" {
			continue
		}
		lo, hi, isRange := strings.Cut(rng, "-")
		values := []string{lo}
		if isRange {
			values = append(values, hi)
		}
		for _, v := range values {
			n, err := strconv.Atoi(v)
			if err != nil {
				if v == "" || v[0] == '-' || (v[0] >= '0' && v[0] <= '9') {
					return fmt.Sprintf("the %s %q is not a number: %s", c.name, part, span)
				}
				continue // a name
			}
			if n < c.min || n > c.max {
				return fmt.Sprintf("the %s %d is out of range: %s", c.name, n, span)
			}
		}
		if a, errA := strconv.Atoi(lo); isRange && errA == nil {
			if b, errB := strconv.Atoi(hi); errB == nil && a > b {
				return fmt.Sprintf("the %s range %q runs backwards: write the smaller value first (%s)", c.name, rng, span)
			}
		}
	}
	return ""
}
