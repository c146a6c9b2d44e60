# Evaluates a Vagrantfile against a recording stand-in for Vagrant's
# configuration API and prints what it configured as JSON.
require "json"

class Recorder
  attr_reader :calls
  def initialize(path = [])
    @path = path
    @calls = []
    @children = {}
  end

  def method_missing(name, *args, **kwargs, &block)
    key = name.to_s
    if key.end_with?("=")
      @calls << { "path" => (@path + [key.chomp("=")]).join("."), "value" => args.first }
      return args.first
    end
    if args.empty? && kwargs.empty? && block.nil?
      @children[key] ||= Recorder.new(@path + [key])
      return @children[key]
    end
    @calls << { "path" => (@path + [key]).join("."), "args" => args, "kwargs" => kwargs }
    if block
      child = Recorder.new(@path + [key, args.first.to_s])
      block.call(child)
      @calls.concat(child.all_calls)
    end
    nil
  end

  def respond_to_missing?(*) = true

  def all_calls
    @calls + @children.values.flat_map(&:all_calls)
  end
end

module Vagrant
  def self.configure(version)
    raise "unsupported Vagrant config version #{version}" unless version == "2"
    recorder = Recorder.new(["config"])
    yield recorder
    puts JSON.generate(recorder.all_calls)
  end
end

load ARGV.fetch(0)
