// Command healthcheck evaluates an Argo CD custom health script (a `resource.customizations.health.*`
// key of argocd-cm) on Kubernetes objects the way Argo CD's application controller does, for tests.
//
//	healthcheck SCRIPT.lua [OBJECTS.json]   (objects default to stdin)
//	kubectl get augruns -A -o json | healthcheck charts/llm2llm-operator/health.lua
//
// OBJECTS.json is a JSON array of resource objects as the API server returns them, or what `kubectl get
// -o json` prints (a List, or one object). It prints one JSON array, one {"status", "message"} per object,
// in order, with "error" set when Argo CD would show the script's failure (status Unknown, the error as
// message).
//
// What matches Argo CD (util/lua and gitops-engine's health package, checked against v3 with gopher-lua
// v1.1.2, the version it pins):
//   - gopher-lua, a fresh state per evaluation, with only the base, package and table libraries and an
//     os library of just time and date: no string, math, io or coroutine (argocd-cm scripts run so unless
//     resource.customizations.useOpenLibs.<group>_<kind> is set, which our install does not set);
//   - the object as Kubernetes' JSON decoding leaves it (integers int64, others float64; both become Lua
//     numbers), null values and null array items absent, empty arrays and maps as empty tables, the
//     global `obj`;
//   - a 1 s limit per evaluation;
//   - the returned table read back through JSON into {status, message}: nil, an empty table or a field
//     of the wrong type gives no health (status ""), a status outside Argo CD's six gives Unknown "Lua
//     returned an invalid health status", a value that is not a table is an error;
//   - an object with metadata.deletionTimestamp (and no Argo CD hook finalizer) is "Progressing, Pending
//     deletion" without running the script.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
)

const (
	scriptTimeout = time.Second
	hookFinalizer = "argocd.argoproj.io/hook-finalizer"
)

var validStatus = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Error   string `json:"error,omitempty"`
}

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "healthcheck:", err)
		os.Exit(2)
	}
}

func run(args []string, stdin io.Reader, stdout io.Writer) error {
	if len(args) < 1 || len(args) > 2 {
		return errors.New("usage: healthcheck SCRIPT.lua [OBJECTS.json]")
	}
	script, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	source, in := "stdin", stdin
	if len(args) == 2 {
		source = args[1]
		f, err := os.Open(source)
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	}
	objects, err := readObjects(in, source)
	if err != nil {
		return err
	}
	out := make([]verdict, len(objects))
	for i, obj := range objects {
		out[i] = evaluate(string(script), obj)
	}
	enc := json.NewEncoder(stdout)
	enc.SetEscapeHTML(false)
	return enc.Encode(out)
}

// readObjects decodes a JSON array of objects with Kubernetes' number rules: an integer literal is an
// int64, any other number a float64 (what the controller's unstructured objects hold).
func readObjects(in io.Reader, source string) ([]map[string]any, error) {
	dec := json.NewDecoder(in)
	dec.UseNumber()
	var doc any
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("%s: not JSON: %w", source, err)
	}
	var raw []any
	switch d := doc.(type) {
	case []any:
		raw = d
	case map[string]any: // what `kubectl get -o json` prints: a List, or one object
		if items, ok := d["items"].([]any); ok {
			raw = items
		} else {
			raw = []any{d}
		}
	default:
		return nil, fmt.Errorf("%s: not a JSON array of objects, a List or an object", source)
	}
	objects := make([]map[string]any, len(raw))
	for i, item := range raw {
		obj, ok := item.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("%s: item %d is not a JSON object", source, i)
		}
		converted, err := kubeNumbers(obj)
		if err != nil {
			return nil, fmt.Errorf("%s: item %d: %w", source, i, err)
		}
		objects[i] = converted.(map[string]any)
	}
	return objects, nil
}

func kubeNumbers(v any) (any, error) {
	switch x := v.(type) {
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return i, nil
		}
		f, err := x.Float64()
		if err != nil {
			return nil, fmt.Errorf("number %s: %w", x, err)
		}
		return f, nil
	case []any:
		for i := range x {
			c, err := kubeNumbers(x[i])
			if err != nil {
				return nil, err
			}
			x[i] = c
		}
	case map[string]any:
		for k := range x {
			c, err := kubeNumbers(x[k])
			if err != nil {
				return nil, err
			}
			x[k] = c
		}
	}
	return v, nil
}

func evaluate(script string, obj map[string]any) verdict {
	if deleting(obj) {
		return verdict{Status: "Progressing", Message: "Pending deletion"}
	}
	v, err := runScript(script, obj)
	if err != nil {
		return verdict{Status: "Unknown", Message: err.Error(), Error: err.Error()}
	}
	return v
}

func deleting(obj map[string]any) bool {
	meta, _ := obj["metadata"].(map[string]any)
	if meta == nil || meta["deletionTimestamp"] == nil {
		return false
	}
	finalizers, _ := meta["finalizers"].([]any)
	for _, f := range finalizers {
		if f == hookFinalizer {
			return false
		}
	}
	return true
}

func runScript(script string, obj map[string]any) (verdict, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	if err := openLibraries(L); err != nil {
		return verdict{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	L.SetContext(ctx)
	L.SetGlobal("obj", toLua(L, obj))

	fn, err := L.LoadString(script)
	if err == nil {
		L.Push(fn)
		err = L.PCall(0, lua.MultRet, nil)
	}
	if err != nil {
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = "" // Argo CD shows the error without gopher-lua's stack trace
		}
		return verdict{}, err
	}
	return readResult(L.Get(-1))
}

// openLibraries opens what Argo CD opens for a script without useOpenLibs: base, package, table, and
// an os library cut down to time and date (the rest could exit the process or touch files).
func openLibraries(L *lua.LState) error {
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, lua.OpenOs},
	} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return fmt.Errorf("opening Lua library %q: %w", lib.name, err)
		}
	}
	osmod, ok := L.GetGlobal(lua.OsLibName).(*lua.LTable)
	if !ok {
		return errors.New("the os library did not open")
	}
	// The same table is package.loaded.os, so require("os") gets the cut-down one too.
	var drop []lua.LValue
	osmod.ForEach(func(k, _ lua.LValue) {
		if name := k.String(); name != "time" && name != "date" {
			drop = append(drop, k)
		}
	})
	for _, k := range drop {
		osmod.RawSet(k, lua.LNil)
	}
	return nil
}

// toLua converts a decoded JSON value as Argo CD does: nil is no value at all, so a null field is
// absent and a null array item is skipped (LTable.Append ignores nil).
func toLua(L *lua.LState, v any) lua.LValue {
	switch x := v.(type) {
	case bool:
		return lua.LBool(x)
	case string:
		return lua.LString(x)
	case int64:
		return lua.LNumber(x)
	case float64:
		return lua.LNumber(x)
	case []any:
		t := L.CreateTable(len(x), 0)
		for _, item := range x {
			t.Append(toLua(L, item))
		}
		return t
	case map[string]any:
		t := L.CreateTable(0, len(x))
		for k, item := range x {
			t.RawSetH(lua.LString(k), toLua(L, item))
		}
		return t
	}
	return lua.LNil
}

func readResult(ret lua.LValue) (verdict, error) {
	switch ret.Type() {
	case lua.LTNil:
		return verdict{}, nil
	case lua.LTTable:
	default:
		return verdict{}, fmt.Errorf("expect table output from Lua script, not %s", ret.Type())
	}
	data, err := luajson.Encode(ret)
	if err != nil {
		return verdict{}, err
	}
	var hs struct {
		Status  string `json:"status"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(data, &hs); err != nil {
		// Argo CD meant this for an empty table (it encodes as []) but it catches every type mismatch,
		// a number as message included: no health, no error.
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return verdict{}, nil
		}
		return verdict{}, err
	}
	if !validStatus[hs.Status] {
		return verdict{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return verdict{Status: hs.Status, Message: hs.Message}, nil
}
