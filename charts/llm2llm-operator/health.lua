-- Argo CD health check for AugmentationRun (llm2llm.io/v1alpha1).
-- Install: the argocd-cm key `resource.customizations.health.llm2llm.io_AugmentationRun` (see
-- examples/gitops/argocd/argocd-cm-health.yaml, a copy kept identical by tests/unit/test_health_lua.py).
-- Lua 5.1 as Argo CD runs it: gopher-lua with only the base, table and os.time/os.date libraries (no string,
-- math or string methods); tests/argocd runs it so. Reads only what RunStatus.wire() writes
-- (python/llm2llm/status.py).
--
--   no status yet, or a spec generation not yet observed  -> Progressing
--   Ready=False reason InvalidSpec                          -> Degraded  (only a spec edit can fix it)
--   phase Failed                                            -> Degraded
--   phase Succeeded                                         -> Healthy
--   phase Suspended                                         -> Suspended
--   phase Pending / Running (incl. Ready=False while a referenced Secret or ConfigMap is missing,
--   and backing off before a retry)                         -> Progressing
local hs = {}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c == nil then
    return ""
  end
  local text = c.reason or ""
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local function progress(status)
  local parts = {}
  if status.iterationLabel ~= nil then
    table.insert(parts, "iteration " .. status.iterationLabel)
  end
  if status.stage ~= nil then
    table.insert(parts, "stage " .. status.stage)
  end
  if status.testAccuracy ~= nil then
    table.insert(parts, "test accuracy " .. tostring(status.testAccuracy))
  end
  return table.concat(parts, ", ")
end

local function join(a, b)
  if a == "" then
    return b
  end
  if b == "" then
    return a
  end
  return a .. "; " .. b
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the run"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = condition(status, "Ready")
if ready ~= nil and ready.status == "False" and ready.reason == "InvalidSpec" then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

local phase = status.phase
if phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition(status, "Failed")
  if failed ~= nil and failed.status == "True" then
    hs.message = describe(failed)
  elseif ready ~= nil and ready.status == "False" then
    hs.message = describe(ready)
  else
    hs.message = "Failed: " .. (status.stopReason or "unknown reason")
  end
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = join(describe(condition(status, "Succeeded")), progress(status))
  if hs.message == "" then
    hs.message = "Succeeded"
  end
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = join("Suspended (spec.suspend is true)", progress(status))
  return hs
end

-- Pending or Running.
hs.status = "Progressing"
local message = phase
if ready ~= nil and ready.status == "False" then
  message = join(message, "waiting: " .. describe(ready))
else
  local progressing = condition(status, "Progressing")
  if progressing ~= nil and progressing.status == "True" and progressing.message ~= nil and progressing.message ~= "" then
    message = join(message, progressing.message)
  end
end
hs.message = join(message, progress(status))
return hs
